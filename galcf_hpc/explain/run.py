"""``galcf-hpc explain``: counterfactuals of every galaxy of a split towards every other
class, their metrics (validity first), and the paper's Figure 3 grid."""

import logging
from pathlib import Path

import torch

from ..config import config_from_dict
from ..data.classes import CLASS_NAMES
from ..device import resolve_device, use_device
from ..errors import CheckpointError
from ..fileio import write_json
from ..judges import load_judges
from ..model.galcf import GalaxyCF
from ..train.checkpoint import check_compatible, latest_checkpoint, load_checkpoint
from .figures import write_grids
from .passes import explanation_pass

log = logging.getLogger("galcf_hpc")

DEFINITIONS = {
    "validity_model": "fraction of counterfactuals whose re-encoding the model assigns to the target class "
    "(necessary, never sufficient: the decoder was trained against this encoder); with model.classify_views > 1 "
    "the model classifies galaxies and counterfactuals alike by the mean over that many symmetric views",
    "validity_<judge>": "fraction of counterfactuals that judge (an independent classifier nothing in training "
    "optimised against) assigns to the target class",
    "validity_panel": "mean of the judges' validities; panel_all: every judge accepts; panel_majority: more than "
    "half accept",
    "judges_on_reconstructions": "each judge's classification of the reconstructions x~ of the same galaxies: "
    "what the decoder keeps of a class's structure, about the most a counterfactual towards it can show that judge",
    "overlay_validity_<judge>": "that judge's verdict on the image the counterfactual grid shows, x + (x_cf - x~) "
    "(the input with the change applied) rather than x_cf itself; overlay_validity_panel: their mean",
    "luminance_share": "share of the energy of x_cf - x~ in its band-mean (luminance) part; 0 = pure recolouring",
    "msd_rec/ssim_rec": "counterfactual x_cf vs the reconstruction x~",
    "msd_input/ssim_input": "counterfactual x_cf vs the input x",
    "background_msd/center_msd": "mean squared change x_cf - x~ in the outer explain.background_fraction of the "
    "side (sky) vs the centre (galaxy)",
}


def load_run(run_dir, checkpoint=None, device="cpu", overrides=()):
    """Model (eval mode, on ``device``) and config of a run directory's newest checkpoint."""
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint under {Path(run_dir) / 'checkpoints'}; train the run first")
    state = load_checkpoint(path)
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"checkpoint {path} has no 'config'/'model' entries; not a galcf-hpc checkpoint")
    cfg = config_from_dict(state["config"], overrides)
    model = GalaxyCF.from_config(cfg)
    check_compatible(model, state["model"], path)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, path


@torch.no_grad()
def explain(run_dir, split=None, targets=None, max_galaxies=None, device="auto", checkpoint=None, placement=None):
    """Explain every galaxy of ``split``; writes counterfactuals.json and the grid PNGs into
    ``run_dir`` and returns the summary dict. ``placement`` (boundary | translate) overrides
    the run's ``explain.placement``."""
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    use_device(dev)  # batches of one shape (only the last is shorter): cuDNN tunes them once
    model, cfg, ckpt = load_run(run_dir, checkpoint, dev, [f"explain.placement={placement}"] if placement else ())
    judges, judge_note = load_judges(run_dir, dev)
    split = split or cfg.explain.split
    limit = cfg.explain.max_galaxies if max_galaxies is None else max_galaxies
    done = explanation_pass(model, cfg, judges, dev, split, limit, targets)
    numbers = done.accumulator.summary(CLASS_NAMES)
    summary = explanation_summary(run_dir, ckpt, split, cfg, numbers, judges, judge_note, done.precision)
    write_explanation(run_dir, summary, done.rows)
    return summary


def explanation_summary(run_dir, ckpt, split, cfg, numbers, judge_names, judge_note, precision):
    """counterfactuals.json's dict: ``numbers`` is the pass's
    :meth:`~galcf_hpc.model.evaluation.Accumulator.summary` over ``split``, ``precision`` that
    of the model in it (bf16 or fp32; the judges classify in fp32)."""
    return {
        "run": str(run_dir),
        "checkpoint": str(ckpt),
        "split": split,
        "margin": cfg.explain.margin,
        "placement": cfg.explain.placement,
        "precision": precision,
        **numbers,
        "judge_names": list(judge_names),
        "judge_note": judge_note,
        "definitions": DEFINITIONS,
    }


def write_explanation(run_dir, summary, rows=None):
    """RUN/counterfactuals.json and, given the Figure-3 ``rows`` of
    :meth:`~galcf_hpc.model.evaluation.FigurePool.rows`, the grid PNGs next to it."""
    write_json(Path(run_dir) / "counterfactuals.json", summary)
    if rows is not None:
        write_grids(run_dir, *rows)  # on any device: the grids copy what they draw to the CPU
