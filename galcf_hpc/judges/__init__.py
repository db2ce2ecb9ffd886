"""The judge panel: independent classifiers that nothing in training optimises against.

Judges decide whether a counterfactual really looks like its target class. They share no
code path, weights or training signal with the model (``galcf_hpc.train`` and
``galcf_hpc.model`` never import this package; an import-linter contract keeps it so).
"""

from .nets import build_judge, load_judge, predict
from .train import DEFAULT_PANEL, judges_dir, load_judges, train_judges

__all__ = ["DEFAULT_PANEL", "build_judge", "judges_dir", "load_judge", "load_judges", "predict", "train_judges"]
