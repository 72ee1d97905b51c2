"""Measure stage: hooks on a real pipeline call -> per-step norms on the device -> a tidy frame -> statistics.

* ``capture``: the hooks, in a context manager that always removes them;
* ``sampling``: the pipeline call per (prompt, seed) batch, shared by every job;
* ``table``: the tidy per-row frame and its column names;
* ``stats``: profiles, prompt-cluster bootstrap CIs, inflation (sigma-integral headline, step mean), regions;
* ``store``: finished batches of an unfinished run (resume);
* ``fingerprint``: what a resume or a reference is keyed on (prompts, pipeline, checkpoints, versions);
* ``distributed``: batches shared out across accelerate / torchrun processes;
* ``prompts``: prompt files and (prompt, seed) samples.
"""
