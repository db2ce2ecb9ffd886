"""``galcf-hpc judges check``: the judge panel on galaxies it has never seen.

The judges (and, passed in from above, the model of the run) classify every galaxy of a
labelled astroNN-format catalog, for instance one rendered by the analytic renderer
(:mod:`galcf_hpc.data.analytic`), which shares no code with the GalSim generator the run
was trained on. Images go through the evaluation transform of the loaders (central crop
``data.crop_fraction``, resize to ``data.image_size``, no rotation), the same as in
``evaluate_judge`` and the catalog job. Accuracy, macro-F1, per-class accuracy and the
confusion matrix per classifier are written as JSON.

This module sits below ``train/`` and ``explain/``: it cannot load the model itself. A
caller above (the CLI) loads it and passes it as a :class:`Classifier`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.classes import CLASS_NAMES, NUM_CLASSES
from ..data.galaxy10 import open_catalog
from ..device import resolve_device
from ..errors import CheckpointError, DataError
from ..fileio import write_json
from ..loaders.augment import augment_batch
from ..metrics import classification_summary, confusion_matrix
from ..progress import Progress
from .nets import predict
from .train import judges_dir, load_judges


@dataclass(frozen=True)
class Classifier:
    """Something that classifies: ``predict`` maps float images [B, 3, R, R] in [0, 1]
    (R = ``image_size``, after the central ``crop_fraction``) to class indices [B]."""

    name: str
    predict: Callable
    image_size: int
    crop_fraction: float
    kind: str = "judge"
    description: str = ""


def default_out(run_dir, data):
    """RUN/judges/check-<data file stem>.json"""
    return judges_dir(run_dir) / f"check-{Path(data).stem}.json"


def panel_classifiers(cfg, device):
    """([Classifier] of every trained judge of the run of ``cfg``, note on missing judges).

    Raises CheckpointError when the run has no judges directory or no trained judge in it.
    """
    root = judges_dir(cfg.run.out_dir)
    hint = f"train the panel with `galcf-hpc judges train --config {Path(cfg.run.out_dir) / 'config.yaml'}`"
    if not root.is_dir():
        raise CheckpointError(f"no judges directory {root}: {hint}")
    judges, note = load_judges(cfg.run.out_dir, device)
    if not judges:
        raise CheckpointError(f"no trained judge in {root} (no <judge>/model.pt): {hint}")
    d = cfg.data
    out = [
        Classifier(name, lambda x, j=judge: predict(j, x), d.image_size, d.crop_fraction, "judge", _describe(judge))
        for name, judge in judges.items()
    ]
    return out, note


def _describe(judge):
    return f"{type(judge).__name__} on {judge.input} input"


def _plain(value):
    """JSON-safe: NaN (a class without galaxies) as null, numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    return value


@torch.no_grad()
def evaluate_classifiers(data, classifiers, device="cpu", batch_size=256, progress=True):
    """Confusion matrix and classification numbers of every classifier on every galaxy of
    the labelled catalog ``data``: ({name: summary}, catalog information)."""
    data = Path(data)
    dev = torch.device(device)
    with open_catalog(data) as cat:  # DataError naming the file when it is missing or unreadable
        if cat.labels is None:
            raise DataError(
                f"{data}: no labels (key 'ans'); judges check needs a labelled catalog, e.g. one "
                "written by `galcf-hpc data synth`"
            )
        labels = torch.from_numpy(cat.labels)
        info = {
            "data": str(data),
            "num_galaxies": cat.n,
            "image_size": cat.image_size,
            "class_counts": dict(zip(CLASS_NAMES, np.bincount(cat.labels, minlength=NUM_CLASSES).tolist())),
            "attrs": _plain(cat.attrs),
        }
        groups = {}
        for c in classifiers:
            groups.setdefault((c.image_size, c.crop_fraction), []).append(c)
        cms = {c.name: torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long) for c in classifiers}
        bar = Progress(cat.n, "judges check") if progress else None
        for start in range(0, cat.n, batch_size):
            stop = min(start + batch_size, cat.n)
            raw = torch.from_numpy(cat.read_images(np.arange(start, stop))).to(dev)
            y = labels[start:stop]
            for (size, crop), members in groups.items():
                x = augment_batch(raw, size, crop)  # the evaluation transform: crop and resize, no rotation
                for c in members:
                    cms[c.name] += confusion_matrix(y, torch.as_tensor(c.predict(x)).cpu(), NUM_CLASSES)
            if bar:
                bar(stop)
    results = {
        c.name: {
            "kind": c.kind,
            "description": c.description,
            "image_size": c.image_size,
            "crop_fraction": c.crop_fraction,
            **classification_summary(cms[c.name], CLASS_NAMES),
        }
        for c in classifiers
    }
    return results, info


def check_panel(cfg, data, device="auto", out=None, extra=()):
    """Evaluate every trained judge of the run of ``cfg`` (and the classifiers in ``extra``,
    e.g. the run's model) on the labelled catalog ``data``; writes the summary atomically
    to ``out`` (default RUN/judges/check-<data stem>.json) and returns it. ``device``: auto,
    cpu, cuda or a torch.device (where ``extra`` already lives)."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if cfg.train.threads > 0 and dev.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    judges, note = panel_classifiers(cfg, dev)
    classifiers = [*judges, *extra]
    results, info = evaluate_classifiers(data, classifiers, dev, batch_size=cfg.explain.batch_size)
    out = Path(out) if out else default_out(cfg.run.out_dir, data)
    summary = _plain(
        {
            "run": str(cfg.run.out_dir),
            **info,
            "device": str(dev),
            "classifiers": results,
            "judge_names": [c.name for c in judges],
            "judge_note": note,
            "definitions": {
                "accuracy": "fraction of the catalog's galaxies classified as their label",
                "macro_f1": "mean F1 over the classes present in the catalog",
                "per_class_accuracy": "recall of each class (null: no galaxy of that class in the catalog)",
                "confusion_matrix": "rows: label, columns: prediction",
                "preprocessing": "central crop of crop_fraction of the side, resized to image_size (the "
                "loaders' evaluation transform)",
            },
        }
    )
    write_json(out, summary)
    summary["out"] = str(out)
    return summary


def _num(x):
    return "  n/a" if x is None else f"{x:.3f}"


def summary_lines(summary):
    """A small table of the check for the terminal."""
    results = summary["classifiers"]
    names = list(results)
    width = max(12, *(len(n) for n in names))
    lines = [
        f"judges check on {summary['data']} ({summary['num_galaxies']} galaxies, {summary['device']})",
        f"{'classifier':{width}s}  {'kind':6s}  accuracy  macro-F1",
    ]
    for n in names:
        r = results[n]
        lines.append(f"{n:{width}s}  {r['kind']:6s}  {_num(r['accuracy']):>8s}  {_num(r['macro_f1']):>8s}")
    lines.append("per-class accuracy:")
    cols = [max(len(n), 5) for n in names]
    lines.append(f"{'class':26s} {'n':>5s}  " + "  ".join(f"{n:>{w}s}" for n, w in zip(names, cols)))
    for cls in CLASS_NAMES:
        row = "  ".join(f"{_num(results[n]['per_class_accuracy'][cls]):>{w}s}" for n, w in zip(names, cols))
        lines.append(f"{cls:26s} {summary['class_counts'][cls]:5d}  {row}")
    if summary.get("judge_note"):
        lines.append(f"note: {summary['judge_note']}")
    lines.append(f"wrote {summary['out']}")
    return lines
