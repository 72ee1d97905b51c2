"""Render stage: what a result looks like, drawn from result objects only (no model is touched).

* ``terminal``: rich tables and headlines on stdout;
* ``files``: the run folder (norms.csv, summary.json, profile.png);
* ``figures``: every figure, as ``matplotlib.figure.Figure`` (the backend is never switched);
* ``ci``: JUnit XML, GitHub step summaries and annotations for ``normscope check``;
* ``numbers``: the one percentage and norm formatter the others share.
"""
