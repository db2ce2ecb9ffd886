"""Loader back-ends behind one batch contract (DESIGN.md): ``images`` float32 [B,3,R,R] in
[0, 1], ``labels`` int64 [B], ``keys``; evaluation batches also carry ``valid`` [B] bool
marking real (not padding) samples. Every rank gets the same number of steps.

Back-ends (``data.loader``): ``torch`` (PIL decoding and torch augmentation in DataLoader
workers, on the CPU), ``dali`` (NVIDIA DALI: decoding and augmentation on the GPU, or on the
CPU with ``data.device: cpu``) and ``synthetic`` (random tensors on the device, for timing
the compute side). ``auto`` is the production choice: ``dali`` on a GPU where DALI is
installed, else ``torch``, with a log line that says which and why (``resolve_loader``).
Each has ``steps_per_epoch``, ``position``, ``set_epoch``,
``state_dict``/``load_state_dict`` and ``close``.
"""

import logging
from pathlib import Path

# ``from torch import cuda``, not ``import torch``: importing the submodule ``.torch`` (the
# torch back-end) rebinds the package's name ``torch`` to that submodule
from torch import cuda

log = logging.getLogger(__name__)


def _local_device_index():
    return cuda.current_device() if cuda.is_available() else None


def check_labels(cfg, split, rank=0, world_size=1):
    """Read the labels of this rank's share of ``<data.shards>/<split>`` (every ``world_size``-th
    sample) through the shard index, whatever the back-end: a label that is not a class is a
    DataError naming the shard and sample before training starts, not an error after hours.
    Returns the number of labels read."""
    from .torch import ShardDataset

    dataset = ShardDataset(Path(cfg.data.shards) / split)
    try:
        for i in range(rank, len(dataset), world_size):
            dataset.label(i)
    finally:
        dataset.close()
    return len(range(rank, len(dataset), world_size))


def _dali_installed():
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no ``nvidia`` namespace package at all
        return False


def resolve_loader(loader, data_device="auto"):
    """(back-end, reason): ``data.loader`` with ``auto`` resolved. ``auto`` picks DALI on the
    GPU when a CUDA device is visible, ``data.device`` allows it and DALI is installed, and
    otherwise the torch back-end, the reason naming what was missing and how to get it."""
    if loader != "auto":
        return loader, f"data.loader: {loader}"
    missing = []
    if not cuda.is_available():
        missing.append("no CUDA device is visible")
    if data_device == "cpu":
        missing.append("data.device is cpu")
    if not _dali_installed():
        missing.append(
            "NVIDIA DALI is not installed (pip install 'galcf-hpc[dali-cuda13]' or [dali-cuda12], "
            "matching the CUDA of this machine)"
        )
    if missing:
        return "torch", "data.loader auto: the torch back-end, since " + "; ".join(missing)
    return "dali", "data.loader auto: DALI on the GPU"


def build_loader(cfg, split, rank=0, world_size=1, train=True):
    """The configured back-end over ``<data.shards>/<split>``; train=False: no augmentation,
    every galaxy exactly once across ranks."""
    d = cfg.data
    split_dir = Path(d.shards) / split
    batch_size = cfg.train.batch_size if train else cfg.explain.batch_size
    common = dict(batch_size=batch_size, image_size=d.image_size, rank=rank, world_size=world_size, train=train)
    loader, reason = resolve_loader(d.loader, d.device)
    if d.loader == "auto" and rank == 0 and train:
        log.info("%s", reason)
    if loader == "torch":
        from .torch import build_torch_loader

        return build_torch_loader(
            split_dir,
            augment=d.augment and train,
            rotation_degrees=d.rotation_degrees,
            crop_fraction=d.crop_fraction,
            num_workers=d.num_workers,
            seed=cfg.run.seed,
            **common,
        )
    if loader == "dali":
        from .dali import DaliLoader, resolve_data_device

        device = "gpu" if d.loader == "auto" else resolve_data_device(d.device)
        return DaliLoader(
            split_dir,
            augment=d.augment and train,
            rotation_degrees=d.rotation_degrees,
            crop_fraction=d.crop_fraction,
            num_threads=max(1, d.num_workers),
            seed=cfg.run.seed,
            device=device,
            device_id=_local_device_index() if device == "gpu" else None,
            **common,
        )
    if loader == "synthetic":
        from .dali import resolve_data_device
        from .synthetic import SyntheticLoader

        device = "cuda" if resolve_data_device(d.device) == "gpu" else "cpu"
        return SyntheticLoader(split_dir, seed=cfg.run.seed, device=device, **common)
    raise ValueError(f"unknown loader back-end {d.loader!r}")
