"""Sweeps: a paper table as a grid of `dpft train` jobs, planned, run and resumed.

The ``*.yaml`` files in this folder are the packaged sweeps (``dpft sweep`` lists them); the modules:

- ``spec``: find and read a sweep file (overrides, grid, report block).
- ``plan``: expand the grid into jobs with their run ids, write/read ``plan.jsonl``, job states.
- ``scheduler``: run a plan (skip done runs, retry, fail fast, Ctrl-C), through
- ``executors``: inline, local worker processes, submitit/Slurm, each job being
- ``job``: one job's process (``python -m dpft.sweeps.job``);
- ``display``: the live table of job states and the sweep's ETA.

Nothing is imported here, so ``dpft --help`` and the job processes load only what they use.
"""
