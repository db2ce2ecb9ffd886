"""Scaling studies: a per-rank timing harness (``harness``), tables and plots of the results
(``analyze``), and a step-time model that projects them to JURECA-DC node counts
(``projection``). Command line: ``galcf-hpc scaling run|analyze|project`` (``commands``);
docs/scaling.md."""
