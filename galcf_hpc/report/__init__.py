"""``galcf-hpc report``: the paper's results for one run as a self-contained HTML page."""

from .build import build_report

__all__ = ["build_report"]
