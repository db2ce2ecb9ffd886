"""Checks every back-end runs before reading a split: manifest present and parsable, every
shard file present with the size the manifest records, and (optionally) every index file
byte-identical to the one the manifest was written with."""

from pathlib import Path

from galcf_hpc.data.shards import read_manifest
from galcf_hpc.errors import DataError
from galcf_hpc.fileio import file_sha256


def verify_hint(split_dir):
    return f"run `galcf-hpc data verify {Path(split_dir).parent}` to find the damaged file, then regenerate the shards"


def open_split(split_dir, hash_indexes=False):
    """(manifest, [(tar path, idx path, num_samples), ...]) of one split directory.

    ``hash_indexes``: compare every ``.idx`` with the sha256 in the manifest (cheap: index
    files are small). A back-end that trusts the index offsets without reading the member
    headers (DALI) needs this to catch an index that no longer belongs to its tar.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(
            f"{split_dir}: split directory does not exist; write shards with `galcf-hpc data shard` or fix the path"
        )
    if not (split_dir / "manifest.json").is_file():
        raise DataError(
            f"{split_dir / 'manifest.json'}: manifest is missing (shards never finished "
            f"writing?); {verify_hint(split_dir)}"
        )
    manifest = read_manifest(split_dir)
    shards = []
    for shard in manifest["shards"]:
        tar_path, idx_path = split_dir / shard["tar"]["file"], split_dir / shard["idx"]["file"]
        if not tar_path.is_file() or tar_path.stat().st_size != shard["tar"]["bytes"]:
            raise DataError(
                f"{tar_path}: shard is missing or its size differs from the manifest; {verify_hint(split_dir)}"
            )
        if not idx_path.is_file():
            raise DataError(f"{idx_path}: index file is missing; {verify_hint(split_dir)}")
        if hash_indexes and file_sha256(idx_path) != shard["idx"]["sha256"]:
            raise DataError(
                f"{idx_path}: index differs from the one written with {tar_path.name} (stale "
                f"index); {verify_hint(split_dir)}"
            )
        shards.append((tar_path, idx_path, shard["num_samples"]))
    if manifest["num_samples"] < 1 or sum(n for *_, n in shards) != manifest["num_samples"]:
        raise DataError(
            f"{split_dir}: shard sample counts do not add up to the manifest's "
            f"{manifest['num_samples']} (a split needs at least one); {verify_hint(split_dir)}"
        )
    return manifest, shards


def steps_per_epoch(split_dir, num_samples, batch_size, world_size, train):
    """Steps every rank runs per epoch, the same for every back-end.

    Training: ``floor(N / world_size)`` samples per rank rounded down to whole batches (the
    remainder is left out of that epoch). Evaluation: ``ceil(N / world_size)`` samples per
    rank rounded up to whole batches (the last ones padded and marked invalid).
    """
    if train:
        steps = (num_samples // world_size) // batch_size
        if steps == 0:
            raise DataError(
                f"{split_dir}: {num_samples} samples give no full batch of {batch_size} "
                f"on each of {world_size} ranks; lower the batch size"
            )
        return steps
    return ceil_div(ceil_div(num_samples, world_size), batch_size)


def ceil_div(a, b):
    return -(-a // b)


class EpochPosition:
    """Epoch/step bookkeeping shared by the back-ends (``self.epoch``, ``self._step``,
    ``self.steps_per_epoch``)."""

    def __len__(self):
        return self.steps_per_epoch

    @property
    def position(self):
        """Batches of the current epoch already returned."""
        return self._step

    def set_epoch(self, epoch):
        if epoch != self.epoch:
            self.epoch, self._step = int(epoch), 0
