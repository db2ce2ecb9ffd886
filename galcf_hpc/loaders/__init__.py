"""Loader back-ends behind one batch contract (DESIGN.md): ``images`` float32 [B,3,R,R] in
[0, 1], ``labels`` int64 [B], ``keys``; evaluation batches also carry ``valid`` [B] bool
marking real (not padding) samples. Every rank gets the same number of steps."""

from pathlib import Path


def build_loader(cfg, split, rank=0, world_size=1, train=True):
    """The configured back-end over ``<data.shards>/<split>``; train=False: no augmentation,
    every galaxy exactly once across ranks."""
    d = cfg.data
    split_dir = Path(d.shards) / split
    if d.loader == "torch":
        from .torch import build_torch_loader

        return build_torch_loader(
            split_dir, batch_size=cfg.train.batch_size if train else cfg.explain.batch_size,
            image_size=d.image_size, rank=rank, world_size=world_size, train=train,
            augment=d.augment and train, rotation_degrees=d.rotation_degrees, crop_fraction=d.crop_fraction,
            num_workers=d.num_workers, seed=cfg.run.seed)
    raise ValueError(f"unknown loader back-end {d.loader!r}")
