"""``galcf-hpc explain``: counterfactuals of every galaxy of a split towards every other
class, their metrics (validity first), and the paper's Figure 3 grid."""

import logging
from pathlib import Path

import torch

from ..config import config_from_dict
from ..data.classes import CLASS_NAMES, NUM_CLASSES
from ..errors import CheckpointError
from ..fileio import write_json
from ..loaders import build_loader
from ..model.galcf import GalaxyCF
from ..progress import Progress
from ..train.checkpoint import check_compatible, latest_checkpoint, load_checkpoint
from ..train.evaluate import accuracy, confusion_matrix, macro_f1, per_class_accuracy
from ..train.loop import resolve_device
from .figures import counterfactual_grid, saliency_grid
from .metrics import msd, ssim

log = logging.getLogger("galcf_hpc")

METRICS = ("validity", "msd_rec", "ssim_rec", "msd_input", "ssim_input", "background_msd", "center_msd")


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


def border_mask(size, fraction, device):
    """True on the outer ``fraction`` of the side on every edge (the sky around the galaxy)."""
    width = max(1, int(round(size * fraction)))
    mask = torch.ones(size, size, dtype=torch.bool, device=device)
    mask[width:size - width, width:size - width] = False
    return mask


def counterfactual_metrics(images, recon, x_cf, pred_cf, target, border):
    """Per-galaxy metrics of counterfactuals x_cf towards ``target`` (dict of [B] tensors)."""
    diff2 = (x_cf - recon).pow(2).mean(1)  # [B,H,W]
    return {
        "validity": (pred_cf == target).float(),
        "msd_rec": msd(x_cf, recon), "ssim_rec": ssim(x_cf, recon),
        "msd_input": msd(x_cf, images), "ssim_input": ssim(x_cf, images),
        "background_msd": diff2[:, border].mean(1), "center_msd": diff2[:, ~border].mean(1),
    }


def iter_counterfactuals(model, images, recon, z, h, pred, targets, margin, border):
    """For each target t: (t, sel, x_cf, metrics) for the galaxies not predicted as t
    (``sel`` selects them; metrics as ``counterfactual_metrics``)."""
    for t in targets:
        sel = pred != t
        if not bool(sel.any()):
            continue
        target = torch.full_like(pred[sel], t)
        x_cf, _ = model.counterfactual(z[sel], h[sel], pred[sel], target, margin)
        pred_cf = model.classify(x_cf)[0]
        yield t, sel, x_cf, counterfactual_metrics(images[sel], recon[sel], x_cf, pred_cf, target, border)


class _Sums:
    def __init__(self):
        self.sums = {k: 0.0 for k in METRICS}
        self.n = 0

    def add(self, values):
        for k in METRICS:
            self.sums[k] += float(values[k].double().sum())
        self.n += len(values["validity"])

    def means(self):
        return {"n": self.n, **{k: self.sums[k] / self.n if self.n else float("nan") for k in METRICS}}


def _figure_rows(model, pool, margin):
    """The pooled galaxies (one per class) and their counterfactuals towards every class."""
    classes = sorted(pool)
    x, z, h, pred = (torch.stack([pool[c][k] for c in classes]) for k in ("images", "z", "h", "pred"))
    recon = model.decoder(z)
    overlays, saliency = [], []
    for t in classes:
        x_cf, _ = model.counterfactual(z, h, pred, torch.full_like(pred, t), margin)
        overlays.append((x + (x_cf - recon)).clamp(0, 1))
        saliency.append(x_cf - recon)
    return x, torch.stack(overlays, 1), torch.stack(saliency, 1), classes


def _grow_pool(pool, images, labels, pred, z, h):
    """Keep one galaxy per true class for the figure, preferring a correctly classified one."""
    for i in range(len(labels)):
        c, correct = int(labels[i]), bool(pred[i] == labels[i])
        if c not in pool or (correct and not pool[c]["correct"]):
            pool[c] = {"correct": correct, "images": images[i], "pred": pred[i], "z": z[i], "h": h[i]}
    return pool


@torch.no_grad()
def explain(run_dir, split=None, targets=None, max_galaxies=None, device="auto", checkpoint=None):
    """Explain every galaxy of ``split``; writes counterfactuals.json and the grid PNGs into
    ``run_dir`` and returns the summary dict."""
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    model, cfg, ckpt = load_run(run_dir, checkpoint, dev)
    split = split or cfg.explain.split
    limit = cfg.explain.max_galaxies if max_galaxies is None else max_galaxies
    targets = list(range(NUM_CLASSES)) if targets is None else list(targets)
    margin = cfg.explain.margin
    loader = build_loader(cfg, split, 0, 1, train=False)
    border = border_mask(cfg.data.image_size, cfg.explain.background_fraction, dev)

    per_target = {t: _Sums() for t in targets}
    recon_ssim = recon_msd = 0.0
    n_gal = 0
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    fig_pool = {}
    bar = Progress(len(loader), f"explain {split}")
    for i, batch in enumerate(loader):
        keep = batch["valid"]
        images = batch["images"][keep].to(dev)
        labels = batch["labels"][keep].to(dev)
        if limit:
            images, labels = images[: limit - n_gal], labels[: limit - n_gal]
        if len(labels) == 0:
            break
        pred, _, h, z = model.classify(images)
        cm += confusion_matrix(labels.cpu(), pred.cpu())
        recon = model.decoder(z)
        recon_ssim += float(ssim(recon, images).sum())
        recon_msd += float(msd(recon, images).sum())
        n_gal += len(labels)
        for t, _, _, metrics in iter_counterfactuals(model, images, recon, z, h, pred, targets, margin, border):
            per_target[t].add(metrics)
        fig_pool = _grow_pool(fig_pool, images, labels, pred, z, h)
        bar(i + 1)
        if limit and n_gal >= limit:
            break

    overall = _Sums()
    for s in per_target.values():
        for k in METRICS:
            overall.sums[k] += s.sums[k]
        overall.n += s.n
    summary = {
        "run": str(run_dir), "checkpoint": str(ckpt), "split": split, "margin": margin,
        "num_galaxies": n_gal,
        "accuracy": accuracy(cm),
        "per_class_accuracy": dict(zip(CLASS_NAMES, per_class_accuracy(cm))),
        "macro_f1": macro_f1(cm),
        "confusion_matrix": cm.tolist(),
        "reconstruction": {"msd": recon_msd / max(n_gal, 1), "ssim": recon_ssim / max(n_gal, 1)},
        "overall": overall.means(),
        "per_target": {CLASS_NAMES[t]: s.means() for t, s in per_target.items()},
        "definitions": {
            "validity": "fraction of counterfactuals whose re-encoding the model assigns to the target class",
            "msd_rec/ssim_rec": "counterfactual x_cf vs the reconstruction x~",
            "msd_input/ssim_input": "counterfactual x_cf vs the input x",
            "background_msd/center_msd": f"mean squared change x_cf - x~ in the outer {cfg.explain.background_fraction}"
                                         " of the side (sky) vs the centre (galaxy)",
        },
    }
    write_json(run_dir / "counterfactuals.json", summary)
    if fig_pool:
        x, overlays, sal, classes = _figure_rows(model, fig_pool, margin)
        names = [CLASS_NAMES[c] for c in classes]
        counterfactual_grid(run_dir / "counterfactual_grid.png", x.cpu(), overlays.cpu(), names)
        saliency_grid(run_dir / "saliency_grid.png", sal.cpu(), names)
    return summary

