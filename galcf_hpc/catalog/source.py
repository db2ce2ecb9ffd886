"""Inputs of the catalog job: an astroNN-format .h5 or a shard split directory, read in
contiguous ranges of their natural order (file order; shard order for shards).

Both give every rank the same ``keys`` (cheap: generated for .h5, from the DALI index files
for shards) and read images, labels and sky positions only for the range asked for, so a
catalog of any size is never loaded whole.

Two fingerprints identify the input: ``fingerprint`` of the whole input (cheap, compared
when a run resumes), and :meth:`unit_sha256` of one unit's rows as stored (reads those
rows; written into every part file and compared by ``catalog verify``).
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from ..data.galaxy10 import open_catalog
from ..data.shards import read_index, sample_key
from ..errors import DataError
from ..fileio import file_sha256
from ..loaders.torch import ShardDataset

_HASH_BLOCK = 64  # galaxies read at a time while hashing a unit of an .h5 input


def _feed(digest, *items):
    """Add byte strings to a sha256, each preceded by its length, so that bytes cannot
    move from one item (or row) to the next without changing the digest."""
    for item in items:
        digest.update(len(item).to_bytes(8, "little"))
        digest.update(item)


class H5Source:
    """An astroNN-format catalog; keys are the shard keys of the source index (g0000042)."""

    def __init__(self, path):
        self.path = Path(path)
        self.catalog = open_catalog(self.path)
        self.n = len(self.catalog)
        self.keys = [sample_key(i) for i in range(self.n)]
        st = self.path.stat()
        # Hashing a catalog of hundreds of GB would take longer than the job; size and shape
        # identify it well enough to refuse resuming into another catalog's output.
        self.fingerprint = f"h5:{self.n}x{self.catalog.image_size}px:{st.st_size}B"

    def unit_sha256(self, start, stop):
        """sha256 over rows ``start:stop`` as read: per galaxy its key, label, ra, dec (int64,
        float64, float64 little-endian) and image bytes (uint8, as stored)."""
        digest = hashlib.sha256()
        for b0 in range(start, stop, _HASH_BLOCK):
            data = self.read(b0, min(b0 + _HASH_BLOCK, stop))
            labels = np.asarray(data["labels"], "<i8")
            ra, dec = np.asarray(data["ra"], "<f8"), np.asarray(data["dec"], "<f8")
            for i, key in enumerate(data["keys"]):
                _feed(
                    digest,
                    key.encode(),
                    labels[i].tobytes(),
                    ra[i].tobytes(),
                    dec[i].tobytes(),
                    np.ascontiguousarray(data["images"][i]).tobytes(),
                )
        return digest.hexdigest()

    def read(self, start, stop):
        c = self.catalog
        labels = c.labels[start:stop] if c.labels is not None else np.full(stop - start, -1)
        return {
            "images": c.read_images(np.arange(start, stop)),
            "keys": self.keys[start:stop],
            "labels": labels,
            "ra": c.ra[start:stop],
            "dec": c.dec[start:stop],
        }

    def close(self):
        self.catalog.close()


class ShardSource:
    """One split of a shard directory; ra/dec come from each sample's json member."""

    def __init__(self, split_dir):
        self.path = Path(split_dir)
        self.dataset = ShardDataset(self.path)
        self.n = len(self.dataset)
        self.keys = self.dataset.keys
        self.fingerprint = "shards:" + file_sha256(self.path / "manifest.json")
        # per sample: its tar and {member extension: (offset, size)} from the index files
        self._members = []
        for shard in self.dataset.manifest["shards"]:
            tar = self.path / shard["tar"]["file"]
            for sample in read_index(self.path / shard["idx"]["file"]):
                self._members.append((tar, {c["ext"]: (c["offset"], c["size"]) for c in sample["components"]}))

    def unit_sha256(self, start, stop):
        """sha256 over samples ``start:stop`` as stored: per sample its key, then every
        member (extension and raw bytes: image, cls, json) in the order of the extensions.
        Raw bytes, not decoded images: cheap to read again, and independent of the decoder."""
        digest, handles = hashlib.sha256(), {}
        try:
            for i in range(start, stop):
                tar, members = self._members[i]
                if tar not in handles:
                    try:
                        handles[tar] = open(tar, "rb")
                    except OSError as exc:
                        raise DataError(
                            f"{tar}: cannot be opened ({exc}); run `galcf-hpc data verify {self.path.parent}`"
                        ) from None
                _feed(digest, self.keys[i].encode())
                for ext in sorted(members):
                    offset, size = members[ext]
                    handles[tar].seek(offset)
                    raw = handles[tar].read(size)
                    if len(raw) != size:
                        raise DataError(
                            f"{tar}: member {self.keys[i]}.{ext} ends early (the tar is truncated); run "
                            f"`galcf-hpc data verify {self.path.parent}` and regenerate the shards"
                        )
                    _feed(digest, ext.encode(), raw)
        finally:
            for fh in handles.values():
                fh.close()
        return digest.hexdigest()

    def _position(self, i):
        tar, members = self._members[i]
        where = members.get("json")
        if where is None:
            return np.nan, np.nan
        with open(tar, "rb") as fh:
            fh.seek(where[0])
            raw = fh.read(where[1])
        try:
            meta = json.loads(raw)
        except ValueError as exc:
            raise DataError(
                f"{tar}: json member of sample {self.keys[i]} cannot be parsed ({exc}); run "
                f"`galcf-hpc data verify {self.path.parent}` and regenerate the shards"
            ) from None
        return tuple(np.nan if meta.get(k) is None else float(meta[k]) for k in ("ra", "dec"))

    def read(self, start, stop):
        samples = [self.dataset[i] for i in range(start, stop)]
        ra, dec = np.asarray([self._position(i) for i in range(start, stop)], dtype=np.float64).T
        return {
            "images": np.stack([s["image"] for s in samples]),
            "keys": [s["key"] for s in samples],
            "labels": np.asarray([s["label"] for s in samples]),
            "ra": ra,
            "dec": dec,
        }

    def close(self):
        self.dataset.close()


def open_source(path):
    """The catalog job's input at ``path``: a shard split directory or an astroNN .h5."""
    path = Path(path)
    if path.is_dir():
        return ShardSource(path)
    if path.is_file():
        return H5Source(path)
    raise DataError(
        f"{path}: input does not exist; pass a shard split directory (e.g. shards/test) "
        "or an astroNN-format .h5 catalog"
    )
