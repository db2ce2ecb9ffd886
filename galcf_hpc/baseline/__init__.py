"""An independent plain CNN classifier: the yardstick for the model's accuracy and the
"independent validity" of its counterfactuals (does a classifier that never saw the
model's latent space also put x_cf into the target class?)."""

from .classifier import BaselineCNN, load_baseline, predict
from .train import baseline_dir, evaluate_baseline, train_baseline

__all__ = ["BaselineCNN", "load_baseline", "predict", "baseline_dir", "evaluate_baseline", "train_baseline"]
