"""Plain PyTorch loader back-end: random access into the shards through their DALI indexes.

Batches follow the loader contract: ``images`` float32 [B, 3, R, R] in [0, 1], ``labels``
int64 [B], ``keys`` list[str], and for evaluation (``train=False``) ``valid`` bool [B].

Per epoch and rank:
- training: the split is permuted with a generator seeded by (seed, epoch); every rank
  takes ``floor(N / world_size)`` samples rounded down to whole batches, as a strided,
  disjoint slice of the permutation. The remainder (fewer than ``world_size * batch_size``
  samples, different ones each epoch) is dropped, so all batches are full and all ranks
  run the same number of steps.
- evaluation: the split in shard order, rank r taking every world_size-th sample, so each
  sample is seen exactly once across ranks. Ranks are padded with repeats of their own
  samples to the same number of full batches; ``valid`` is False on the padding.

Augmentation angles come from (seed, epoch, key) (see ``augment.py``), so batches are
identical for any ``num_workers``. ``state_dict()`` holds (epoch, step) plus the layout it
belongs to; a run restored from it continues mid-epoch with exactly the remaining batches.
"""

import io
import os
import weakref
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from galcf_hpc.data.classes import NUM_CLASSES
from galcf_hpc.data.shards import read_index
from galcf_hpc.errors import CheckpointError, DataError
from galcf_hpc.loaders.augment import augment_batch, sample_angles
from galcf_hpc.loaders.split import EpochPosition, open_split, steps_per_epoch
from galcf_hpc.loaders.split import verify_hint as _verify_hint

_TAR_BLOCK = 512


class ShardDataset(torch.utils.data.Dataset):
    """Map-style view of one split: ``dataset[i]`` -> {"image": uint8 [S, S, 3], "label", "key"}.

    Reads only the index files and manifest at construction; tar files are opened lazily
    in each process that reads (DataLoader workers get their own handles).
    """

    def __init__(self, split_dir):
        self.split_dir = Path(split_dir)
        self.manifest, shards = open_split(self.split_dir)
        self.image_size = self.manifest["image_size"]
        self.image_ext = self.manifest["image_format"]
        self._tars = []
        keys, shard_of, image_at, label_at = [], [], [], []
        for shard_no, (tar_path, idx_path, num_samples) in enumerate(shards):
            index = read_index(idx_path)
            if len(index) != num_samples:
                raise DataError(
                    f"{idx_path}: {len(index)} samples, manifest says {num_samples}; {_verify_hint(self.split_dir)}"
                )
            self._tars.append(tar_path)
            for sample in index:
                parts = {c["ext"]: c for c in sample["components"]}
                if self.image_ext not in parts or "cls" not in parts or sample["key"] is None:
                    raise DataError(
                        f"{tar_path}: sample {sample['key']} lacks a named {self.image_ext} or "
                        f"cls member in its index; {_verify_hint(self.split_dir)}"
                    )
                keys.append(sample["key"])
                shard_of.append(shard_no)
                image_at.append((parts[self.image_ext]["offset"], parts[self.image_ext]["size"]))
                label_at.append((parts["cls"]["offset"], parts["cls"]["size"]))
        self.keys = keys
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._image_at = np.asarray(image_at, dtype=np.int64)
        self._label_at = np.asarray(label_at, dtype=np.int64)
        self._handles = {}
        self._pid = os.getpid()

    def __len__(self):
        return len(self.keys)

    def __getstate__(self):
        # Open files do not travel to worker processes; each opens its own.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, shard_no):
        if self._pid != os.getpid():  # forked worker: never share a file position
            self._handles, self._pid = {}, os.getpid()
        if shard_no not in self._handles:
            try:
                self._handles[shard_no] = open(self._tars[shard_no], "rb")
            except OSError as exc:
                raise DataError(
                    f"{self._tars[shard_no]}: cannot be opened ({exc}); {_verify_hint(self.split_dir)}"
                ) from None
        return self._handles[shard_no]

    def _read(self, i, offset, size):
        if offset < 0:
            raise DataError(
                f"{self._tars[self._shard_of[i]]}: index gives sample {self.keys[i]} an offset "
                f"before the first member (stale index); {_verify_hint(self.split_dir)}"
            )
        f = self._handle(int(self._shard_of[i]))
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise DataError(
                f"{self._tars[self._shard_of[i]]}: sample {self.keys[i]} ends early (truncated "
                f"shard); {_verify_hint(self.split_dir)}"
            )
        return data

    def __getitem__(self, i):
        key = self.keys[i]
        tar_path = self._tars[self._shard_of[i]]
        offset, size = self._image_at[i]
        # Read the member header too: its name catches an index that no longer fits its tar.
        blob = self._read(i, offset - _TAR_BLOCK, size + _TAR_BLOCK)
        name = blob[:100].rstrip(b"\0").decode("utf-8", "replace")
        if name != f"{key}.{self.image_ext}":
            raise DataError(
                f"{tar_path}: index points at member {name!r} for sample {key} (stale index); "
                f"{_verify_hint(self.split_dir)}"
            )
        try:
            with Image.open(io.BytesIO(blob[_TAR_BLOCK:])) as img:
                image = np.asarray(img.convert("RGB"))
        except Exception as exc:  # Pillow raises many types for corrupt data
            raise DataError(
                f"{tar_path}: sample {key} image cannot be decoded ({exc}); {_verify_hint(self.split_dir)}"
            ) from None
        if image.shape != (self.image_size, self.image_size, 3):
            raise DataError(
                f"{tar_path}: sample {key} image is {image.shape}, manifest says "
                f"{self.image_size}x{self.image_size}; {_verify_hint(self.split_dir)}"
            )
        return {"image": image, "label": self.label(i), "key": key}

    def label(self, i):
        """Sample i's class, read from its ``.cls`` member; DataError naming the shard and
        sample unless it is a class 0-9."""
        label = self._read(i, *self._label_at[i]).strip()
        if not label.isdigit() or int(label) >= NUM_CLASSES:
            raise DataError(
                f"{self._tars[self._shard_of[i]]}: sample {self.keys[i]} has label {label[:20]!r}, not a class "
                f"0-{NUM_CLASSES - 1}; {_verify_hint(self.split_dir)}"
            )
        return int(label)

    def close(self):
        for f in self._handles.values():
            f.close()
        self._handles = {}


class _BatchMaker(torch.utils.data.Dataset):
    """Turns one batch plan (epoch, sample indices, valid flags) into a finished batch.

    A whole batch is one DataLoader item, so workers decode and augment in parallel while
    the order of batches stays the loader's.
    """

    def __init__(self, dataset, image_size, crop_fraction, rotation_degrees, seed):
        self.dataset = dataset
        self.image_size = image_size
        self.crop_fraction = crop_fraction
        self.rotation_degrees = rotation_degrees
        self.seed = seed

    def __getitem__(self, plan):
        epoch, indices, valid = plan
        samples = [self.dataset[i] for i in indices]
        keys = [s["key"] for s in samples]
        raw = torch.from_numpy(np.stack([s["image"] for s in samples]))
        angles = sample_angles(keys, self.seed, epoch, self.rotation_degrees) if self.rotation_degrees else None
        batch = {
            "images": augment_batch(raw, self.image_size, self.crop_fraction, angles),
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "keys": keys,
        }
        if valid is not None:
            batch["valid"] = torch.tensor(valid, dtype=torch.bool)
        return batch


def _same(batch):
    return batch


def _one_thread(_):
    # Workers share a few cores with the training process: one intra-op thread each.
    torch.set_num_threads(1)


class _PlanSampler(torch.utils.data.Sampler):
    """Yields the loader's remaining batch plans of its current epoch, read at iter() time
    so persistent workers see set_epoch() and restored state."""

    def __init__(self, loader):
        # A weak reference: no cycle keeps the DataLoader and its workers alive once the
        # ShardLoader is dropped.
        self.loader = weakref.proxy(loader)

    def __iter__(self):
        return iter(self.loader._plans())

    def __len__(self):
        return self.loader.steps_per_epoch - self.loader._step


class ShardLoader(EpochPosition):
    """Iterable of batches for one rank. See the module docstring for the sampling rules.

    Use ``set_epoch(e)`` before each epoch. Finishing an epoch moves the loader to the next
    one, so ``state_dict()`` taken at any point resumes at the right batch; ``set_epoch``
    with the epoch the loader is already in keeps a restored mid-epoch position.
    """

    def __init__(
        self,
        dataset,
        batch_size,
        image_size,
        rank=0,
        world_size=1,
        train=True,
        augment=True,
        rotation_degrees=180.0,
        crop_fraction=0.7,
        num_workers=0,
        seed=0,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if batch_size < 1 or image_size < 1 or num_workers < 0:
            raise ValueError("batch_size and image_size must be >= 1 and num_workers >= 0")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.train = bool(train)
        self.seed = int(seed)
        n = len(dataset)
        self.steps_per_epoch = steps_per_epoch(dataset.split_dir, n, self.batch_size, self.world_size, self.train)
        degrees = float(rotation_degrees) if (self.train and augment) else 0.0
        self._maker = _BatchMaker(dataset, int(image_size), float(crop_fraction), degrees, self.seed)
        self.epoch = 0
        self._step = 0
        self._dataloader = None
        if num_workers > 0:
            self._dataloader = torch.utils.data.DataLoader(
                self._maker,
                batch_size=None,
                sampler=_PlanSampler(self),
                num_workers=num_workers,
                collate_fn=_same,
                persistent_workers=True,
                worker_init_fn=_one_thread,
            )

    def rank_indices(self, epoch):
        """(sample indices, valid flags) this rank reads in ``epoch``, steps_per_epoch * B long."""
        n, world, need = len(self.dataset), self.world_size, self.steps_per_epoch * self.batch_size
        if self.train:
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            mine = perm[: need * world][self.rank :: world]
            return mine, np.ones(need, dtype=bool)
        mine = np.arange(self.rank, n, world)
        valid = np.arange(need) < len(mine)
        # A rank with no sample of its own (n < world_size) repeats sample 0, all invalid.
        return np.resize(mine if len(mine) else np.zeros(1, np.int64), need), valid

    def _plans(self):
        indices, valid = self.rank_indices(self.epoch)
        b = self.batch_size
        for step in range(self._step, self.steps_per_epoch):
            flags = None if self.train else tuple(valid[step * b : (step + 1) * b].tolist())
            yield self.epoch, tuple(indices[step * b : (step + 1) * b].tolist()), flags

    def __iter__(self):
        batches = iter(self._dataloader) if self._dataloader else map(self._maker.__getitem__, self._plans())
        for batch in batches:
            self._step += 1
            yield batch
        self.epoch, self._step = self.epoch + 1, 0

    def close(self):
        """Stop the worker processes and close the shard files; the loader is done after this."""
        self._dataloader = None  # its persistent iterator shuts the workers down when dropped
        self.dataset.close()

    def state_dict(self):
        """Plain ints/bools only, so checkpoints load with ``torch.load(weights_only=True)``."""
        return {
            "epoch": self.epoch,
            "step": self._step,
            "backend": "torch",
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": len(self.dataset),
            "train": self.train,
        }

    def load_state_dict(self, state):
        layout = {k: state.get(k) for k in ("seed", "world_size", "batch_size", "num_samples", "train")}
        ours = {k: v for k, v in self.state_dict().items() if k in layout}
        if state["step"] and (layout != ours or state.get("backend", "torch") != "torch"):
            raise CheckpointError(
                f"loader state was saved by the {state.get('backend', 'torch')} back-end for "
                f"{layout}, this torch loader is {ours}; a run can resume mid-epoch only "
                "with the same back-end, data, seed, world size and batch size (restart "
                "from an epoch boundary instead)"
            )
        self.epoch, self._step = int(state["epoch"]), int(state["step"])


def build_torch_loader(
    split_dir,
    batch_size,
    image_size,
    rank=0,
    world_size=1,
    train=True,
    augment=True,
    rotation_degrees=180.0,
    crop_fraction=0.7,
    num_workers=0,
    seed=0,
):
    """ShardLoader over one split directory (``<shards>/train`` etc.)."""
    return ShardLoader(
        ShardDataset(split_dir),
        batch_size,
        image_size,
        rank=rank,
        world_size=world_size,
        train=train,
        augment=augment,
        rotation_degrees=rotation_degrees,
        crop_fraction=crop_fraction,
        num_workers=num_workers,
        seed=seed,
    )
