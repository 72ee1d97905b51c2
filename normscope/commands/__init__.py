"""One module per command, each the Python API behind it: ``compare``, ``profile``, ``check``, ``sweep``,
``report``, ``inspect``, ``demo``. Each has one typed config and one entry function; ``cli.py`` only parses."""
