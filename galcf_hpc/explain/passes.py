"""The counterfactual pass over a split: every valid galaxy of it (up to a limit, in loader
order) through :func:`~galcf_hpc.model.evaluation.explain_batch` at the precision the model
trained at, into an :class:`~galcf_hpc.model.evaluation.Accumulator` and a
:class:`~galcf_hpc.model.evaluation.FigurePool`. ``galcf-hpc explain``, the report and
``benchmarks/ablation.py`` all run this one loop, so their numbers are computed alike."""

import math
from dataclasses import dataclass

import torch

from ..data.classes import NUM_CLASSES
from ..device import autocast_precision, inference_autocast
from ..errors import DataError
from ..loaders import build_loader
from ..model.evaluation import Accumulator, FigurePool, explain_batch
from ..progress import Progress


def valid_batches(cfg, split, limit=0, progress=None, cut=None):
    """(keys, images, labels on the CPU) batches of the valid galaxies of ``split``, at most
    ``limit`` in all (0 or None: every galaxy); images stay on the loader's device (DALI on
    GPU, synthetic loader). A batch of padding only is skipped: later ones may still hold
    galaxies. ``progress(batches done, batches in all)`` is called after each batch; ``cut``
    (a list) gets an entry when galaxies of the split were left out because of ``limit``."""
    limit = limit or math.inf
    loader = build_loader(cfg, split, 0, 1, train=False)
    n = 0
    try:
        for b, batch in enumerate(loader):
            if progress is not None:
                progress(b + 1, loader.steps_per_epoch)
            keep = batch["valid"].cpu()
            if n >= limit:
                if cut is not None and bool(keep.any()):
                    cut.append(split)
                break
            take = min(int(keep.sum()), limit - n)
            if cut is not None and take < int(keep.sum()):
                cut.append(split)
            if take == 0:
                continue
            images = batch["images"][keep.to(batch["images"].device)][:take]
            labels = batch["labels"].cpu()[keep][:take]
            keys = [str(k) for k, v in zip(batch["keys"], keep.tolist()) if v][:take]
            yield keys, images, labels
            n += take
    finally:
        loader.close()


@dataclass
class SplitPass:
    """What :func:`explanation_pass` gives: the accumulated numbers, the Figure-3 galaxies and
    (``figures``) their rows for :func:`~galcf_hpc.explain.figures.write_grids`, and whether
    every galaxy of the split was explained (not cut at the limit), and the precision of the
    model's pass (bf16 or fp32)."""

    accumulator: Accumulator
    pool: FigurePool
    rows: tuple | None
    complete: bool
    precision: str


@torch.no_grad()
def explanation_pass(
    model,
    cfg,
    judges,
    device,
    split=None,
    limit=0,
    targets=None,
    placement=None,
    overlay=True,
    figures=True,
    on_batch=None,
    label=None,
):
    """Explain the galaxies of ``split`` (default ``explain.split``, at most ``limit``; 0:
    all) towards ``targets`` (default every class) at ``placement`` (default
    ``explain.placement``) with the run's margin and background fraction. ``judges`` {name:
    module} is the panel, never the model. ``overlay``: the judges also classify the
    overlays x + (x_cf - x~). ``on_batch(keys, images, labels, out)`` sees each batch's
    :class:`~galcf_hpc.model.evaluation.ExplainedBatch` (for per-galaxy rows). The model runs under
    :func:`~galcf_hpc.device.inference_autocast`, the Figure-3 rows too; the judges classify
    in fp32 within it. A split without galaxies is a :class:`~galcf_hpc.errors.DataError`."""
    split = split or cfg.explain.split
    targets = list(range(NUM_CLASSES)) if targets is None else list(targets)
    placement = cfg.explain.placement if placement is None else placement
    acc = Accumulator(targets, NUM_CLASSES, list(judges))
    pool = FigurePool()
    cut = []
    bar = Progress(1, label or f"explain {split}")
    autocast = inference_autocast(device, cfg.train)  # the model at the precision it trained at
    with autocast:
        for keys, images, labels in valid_batches(cfg, split, limit, progress=bar, cut=cut):
            images = images.to(device)
            out = explain_batch(
                model,
                images,
                targets,
                cfg.explain.margin,
                judges,
                cfg.explain.background_fraction,
                placement=placement,
                overlay=overlay,
            )
            acc.add(out, labels)
            pool.add(images, labels, out)
            if on_batch is not None:
                on_batch(keys, images, labels, out)
        if acc.n_galaxies == 0:
            raise DataError(f"split {split!r} of {cfg.data.shards} holds no galaxies to explain")
        # the Figure-3 galaxies decoded once, at the same precision
        rows = pool.rows(model, cfg.explain.margin, placement) if figures and pool else None
    return SplitPass(acc, pool, rows, complete=not cut, precision=autocast_precision(autocast))
