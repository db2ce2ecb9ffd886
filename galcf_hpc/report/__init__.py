"""``galcf-hpc report``: the paper's results for one run as a self-contained HTML page."""

from .build import build_report
from .render import summary_lines

__all__ = ["build_report", "summary_lines"]
