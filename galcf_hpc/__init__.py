"""galcf-hpc: explainable galaxy-morphology classification with counterfactuals, at HPC scale."""

__version__ = "0.1.0"
