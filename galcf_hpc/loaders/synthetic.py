"""Synthetic back-end: random batches made once on the device and handed out again and
again, with no file I/O, decoding or augmentation. A training run fed by it measures the
compute side alone, so benchmarks can split a step into data time and compute time.

It follows the loader contract and the step counts of the real back-ends for the same
split (the split's manifest gives the sample count); the data are noise, so the losses
and accuracies of such a run mean nothing.
"""

import torch

from galcf_hpc.data.classes import NUM_CLASSES
from galcf_hpc.errors import CheckpointError
from galcf_hpc.loaders.split import EpochPosition, open_split, steps_per_epoch

_POOL = 4  # distinct batches, so consecutive steps do not see identical tensors


class SyntheticLoader(EpochPosition):
    def __init__(self, split_dir, batch_size, image_size, rank=0, world_size=1, train=True, seed=0, device="cpu"):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        manifest, _ = open_split(split_dir)
        self.num_samples = manifest["num_samples"]
        self.batch_size, self.rank, self.world_size, self.train = (
            int(batch_size),
            int(rank),
            int(world_size),
            bool(train),
        )
        self.steps_per_epoch = steps_per_epoch(
            split_dir, self.num_samples, self.batch_size, self.world_size, self.train
        )
        self.device = torch.device(device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed) * 1000003 + self.rank)
        shape = (self.batch_size, 3, int(image_size), int(image_size))
        self._pool = [
            {
                "images": torch.rand(shape, generator=gen, device=self.device),
                "labels": torch.randint(0, NUM_CLASSES, (self.batch_size,), generator=gen, device=self.device),
                "keys": [f"synthetic-{self.rank}-{j}-{i}" for i in range(self.batch_size)],
            }
            for j in range(_POOL)
        ]
        self._rank_count = len(range(self.rank, self.num_samples, self.world_size))
        self.epoch, self._step = 0, 0

    def __iter__(self):
        while self._step < self.steps_per_epoch:
            batch = dict(self._pool[self._step % _POOL])
            if not self.train:
                position = self._step * self.batch_size + torch.arange(self.batch_size)
                batch["valid"] = position < self._rank_count
            self._step += 1
            yield batch
        self.epoch, self._step = self.epoch + 1, 0

    def close(self):
        self._pool = []

    def state_dict(self):
        return {
            "epoch": self.epoch,
            "step": self._step,
            "backend": "synthetic",
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "train": self.train,
        }

    def load_state_dict(self, state):
        if state.get("step", 0) and state.get("backend") != "synthetic":
            raise CheckpointError(
                f"loader state was saved mid-epoch by the {state.get('backend', 'torch')} "
                "back-end; the synthetic back-end continues only its own runs"
            )
        self.epoch, self._step = int(state["epoch"]), int(state["step"])
