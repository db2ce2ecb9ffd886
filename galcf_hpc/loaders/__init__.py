"""Loader back-ends behind one batch contract (DESIGN.md): ``images`` float32 [B,3,R,R] in
[0, 1], ``labels`` int64 [B], ``keys``; evaluation batches also carry ``valid`` [B] bool
marking real (not padding) samples. Every rank gets the same number of steps.

Back-ends (``data.loader``): ``torch`` (PIL decoding and torch augmentation in DataLoader
workers, on the CPU), ``dali`` (NVIDIA DALI: decoding and augmentation on the GPU, or on the
CPU with ``data.device: cpu``) and ``synthetic`` (random tensors on the device, for timing
the compute side). Each has ``steps_per_epoch``, ``position``, ``set_epoch``,
``state_dict``/``load_state_dict`` and ``close``.
"""

from pathlib import Path

import torch


def _local_device_index():
    return torch.cuda.current_device() if torch.cuda.is_available() else None


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


def build_loader(cfg, split, rank=0, world_size=1, train=True):
    """The configured back-end over ``<data.shards>/<split>``; train=False: no augmentation,
    every galaxy exactly once across ranks."""
    d = cfg.data
    split_dir = Path(d.shards) / split
    batch_size = cfg.train.batch_size if train else cfg.explain.batch_size
    common = dict(batch_size=batch_size, image_size=d.image_size, rank=rank, world_size=world_size, train=train)
    if d.loader == "torch":
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
    if d.loader == "dali":
        from .dali import DaliLoader, resolve_data_device

        device = resolve_data_device(d.device)
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
    if d.loader == "synthetic":
        from .dali import resolve_data_device
        from .synthetic import SyntheticLoader

        device = "cuda" if resolve_data_device(d.device) == "gpu" else "cpu"
        return SyntheticLoader(split_dir, seed=cfg.run.seed, device=device, **common)
    raise ValueError(f"unknown loader back-end {d.loader!r}")
