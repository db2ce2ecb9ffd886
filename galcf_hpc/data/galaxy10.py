"""Read and write catalogs in astroNN's Galaxy10 DECaLS HDF5 format.

The format (``Galaxy10_DECals.h5``): ``images`` (N, S, S, 3) uint8 (S = 256 in the real
file), ``ans`` (N,) labels 0-9, and ``ra``, ``dec``, ``redshift``, ``pxscale`` (N,)
float64. The reader is lazy: opening validates the header and the small per-galaxy
arrays; images are read only on request, so a 2.5 GB file never has to fit in memory.

A catalog made with planted label noise (``data synth --label-noise P``) also holds
``ans_true`` (N,), the labels before noise, and the attribute ``label_noise``: ``ans`` is
what training sees, ``ans_true`` what measures how well mislabels are found. Readers of
the astroNN format ignore the extra dataset.
"""

from pathlib import Path

import h5py
import numpy as np

from galcf_hpc.data.classes import NUM_CLASSES
from galcf_hpc.errors import DataError
from galcf_hpc.fileio import atomic_path

METADATA_KEYS = ("ra", "dec", "redshift", "pxscale")
TRUE_LABELS_KEY = "ans_true"  # labels before planted noise (data synth --label-noise)
_REGENERATE = "re-download or re-generate it"
# Images are written in blocks of this many galaxies so a writer never holds two copies
# of a large array.
_WRITE_BLOCK = 256


def _fail(path, what, todo=_REGENERATE):
    raise DataError(f"{path}: {what}; {todo}")


def write_catalog(path, images, ans, ra, dec, redshift=None, pxscale=None, attrs=None,
                  compression="gzip", ans_true=None):
    """Write an astroNN-format catalog atomically.

    ``images`` is (N, S, S, 3) uint8; ``ans`` (N,) integer labels 0-9 or None for an
    unlabelled catalog; ``ra``/``dec`` (N,) degrees; ``redshift``/``pxscale`` (N,) or
    None (then omitted, and read back as NaN); ``ans_true`` (N,) the labels before planted
    noise, or None (then omitted). Images are stored one per chunk, compressed
    (``"gzip"``, readable by any HDF5 tool, or ``"lzf"``, faster but h5py-only), so the
    reader can fetch single galaxies cheaply. Inputs are validated before anything is
    written; an existing file at ``path`` is replaced only once the new one is complete.
    """
    path = Path(path)
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
        _fail(path, f"images must have shape (N, S, S, 3), got {images.shape}",
              "pass square RGB cutouts")
    if images.dtype != np.uint8:
        _fail(path, f"images must be uint8, got {images.dtype}", "convert with np.clip(...).astype(np.uint8)")
    n = images.shape[0]
    if n == 0:
        _fail(path, "no images to write", "pass at least one galaxy")
    columns = {}
    if ans is not None:
        ans = np.asarray(ans)
        _check_column(path, "ans", ans, n)
        if not np.issubdtype(ans.dtype, np.integer):
            _fail(path, f"ans must be integer labels, got {ans.dtype}", "pass labels 0-9")
        _check_labels(path, ans)
        columns["ans"] = ans.astype(np.uint8)
    if ans_true is not None:
        if ans is None:
            _fail(path, f"'{TRUE_LABELS_KEY}' given without 'ans'", "pass the noisy labels as ans")
        ans_true = np.asarray(ans_true)
        _check_column(path, TRUE_LABELS_KEY, ans_true, n)
        if not np.issubdtype(ans_true.dtype, np.integer):
            _fail(path, f"{TRUE_LABELS_KEY} must be integer labels, got {ans_true.dtype}", "pass labels 0-9")
        _check_labels(path, ans_true, TRUE_LABELS_KEY)
        columns[TRUE_LABELS_KEY] = ans_true.astype(np.uint8)
    for key, values in (("ra", ra), ("dec", dec), ("redshift", redshift), ("pxscale", pxscale)):
        if values is None:
            if key in ("ra", "dec"):
                _fail(path, f"{key} is required", "pass sky positions in degrees")
            continue
        values = np.asarray(values, dtype=np.float64)
        _check_column(path, key, values, n)
        columns[key] = values
    _check_positions(path, columns["ra"], columns["dec"])
    if compression not in ("gzip", "lzf", None):
        raise ValueError(f"compression must be 'gzip', 'lzf' or None, got {compression!r}")

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset(
                "images", shape=images.shape, dtype=np.uint8, chunks=(1,) + images.shape[1:],
                compression=compression, compression_opts=1 if compression == "gzip" else None,
            )
            for start in range(0, n, _WRITE_BLOCK):
                ds[start:start + _WRITE_BLOCK] = images[start:start + _WRITE_BLOCK]
            for key, values in columns.items():
                f.create_dataset(key, data=values)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value


def _check_column(path, key, values, n):
    if values.ndim != 1 or values.shape[0] != n:
        _fail(path, f"'{key}' has shape {values.shape} but there are {n} images",
              f"'{key}' needs one value per image")


def _check_labels(path, ans, key="ans"):
    """Labels must be integers 0..NUM_CLASSES-1; name the first offending sample."""
    with np.errstate(invalid="ignore"):
        bad = ~((ans >= 0) & (ans < NUM_CLASSES) & (ans == np.floor(ans)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _fail(path, f"'{key}' of sample {i} is {ans[i]!r}, outside the classes 0-{NUM_CLASSES - 1} "
              f"({int(bad.sum())} bad labels in all)", "fix the labels or drop those samples")


def _check_positions(path, ra, dec):
    for key, values in (("ra", ra), ("dec", dec)):
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            _fail(path, f"'{key}' of sample {i} is {values[i]} ({int(bad.sum())} non-finite in all)",
                  "sky positions are needed to group duplicates; fix or drop those samples")
    bad = np.abs(dec) > 90
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _fail(path, f"'dec' of sample {i} is {dec[i]}, outside [-90, 90]", "dec must be in degrees")


class Galaxy10File:
    """A lazily read astroNN-format catalog. Use :func:`open_catalog` to get one.

    Attributes: ``path``, ``n`` (also ``len()``), ``image_size``, ``labels`` (int64 array,
    or None when the file has no ``ans``), ``true_labels`` (int64 array of ``ans_true``, the
    labels before planted noise, or None), ``ra``, ``dec``, ``redshift``, ``pxscale``
    (float64 arrays, NaN-filled where the file lacks the key), ``attrs`` (file attributes).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            _fail(self.path, "file does not exist", "check the path")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            _fail(self.path, f"cannot be opened as HDF5 ({exc}): the file is truncated or not HDF5")
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise

    def _validate(self):
        f = self._file
        if "images" not in f or not isinstance(f["images"], h5py.Dataset):
            _fail(self.path, "key 'images' is missing (keys: " + ", ".join(sorted(f.keys())) + ")",
                  "this is not a Galaxy10-format catalog; re-generate it")
        images = f["images"]
        shape = images.shape
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3 or shape[0] == 0:
            _fail(self.path, f"key 'images' has shape {shape}, expected (N, S, S, 3) with N > 0",
                  "store square RGB cutouts, channels last")
        kind = images.dtype.kind
        if images.dtype == np.uint8:
            self._float_scale = None
        elif kind == "f":
            self._float_scale = self._float_image_scale(images)
        else:
            _fail(self.path, f"key 'images' has dtype {images.dtype}, expected uint8 "
                  "(or float in [0, 1] or [0, 255])", "convert the images to uint8")
        self._images = images
        self.n = shape[0]
        self.image_size = shape[1]

        self.labels = None
        if "ans" in f:
            ans = self._column("ans")
            if ans.dtype.kind not in "iuf":
                _fail(self.path, f"key 'ans' has dtype {ans.dtype}, expected integer labels",
                      "store labels 0-9 as integers")
            _check_labels(self.path, ans)
            self.labels = ans.astype(np.int64)
        self.true_labels = None
        if TRUE_LABELS_KEY in f:
            true = self._column(TRUE_LABELS_KEY)
            if true.dtype.kind not in "iuf":
                _fail(self.path, f"key '{TRUE_LABELS_KEY}' has dtype {true.dtype}, expected integer labels",
                      "store labels 0-9 as integers")
            _check_labels(self.path, true, TRUE_LABELS_KEY)
            self.true_labels = true.astype(np.int64)
        for key in METADATA_KEYS:
            if key in f:
                values = self._column(key)
                if values.dtype.kind not in "iuf":
                    _fail(self.path, f"key '{key}' has dtype {values.dtype}, expected float",
                          "store it as float64")
                values = values.astype(np.float64)
            else:
                values = np.full(self.n, np.nan)
            setattr(self, key, values)
        if "ra" in f or "dec" in f:
            _check_positions(self.path, self.ra, self.dec)
        self.attrs = dict(f.attrs)

    def _column(self, key):
        ds = self._file[key]
        if not isinstance(ds, h5py.Dataset):
            _fail(self.path, f"key '{key}' is a group, expected a dataset", "re-generate the catalog")
        _check_column(self.path, key, ds, self.n)
        try:
            return ds[()]
        except OSError as exc:
            _fail(self.path, f"key '{key}' cannot be read ({exc}): the file is truncated or corrupt")

    def _float_image_scale(self, images):
        """Float catalogs hold [0, 1] or [0, 255]; decide once from the first galaxy."""
        first = self._read_block(images, 0, 1)
        self._check_float(first, 0, 255.0)
        return 1.0 if first.max() <= 1.0 else 255.0

    def _check_float(self, block, start, top):
        finite = np.isfinite(block).all(axis=(1, 2, 3))
        in_range = (block.min(axis=(1, 2, 3), initial=0) >= 0) & (block.max(axis=(1, 2, 3), initial=0) <= top)
        for k in np.flatnonzero(~(finite & in_range)):
            what = "non-finite (NaN/inf) pixels" if not finite[k] else f"pixels outside [0, {top:g}]"
            _fail(self.path, f"key 'images' sample {start + k} has {what}",
                  "fix or drop that sample (float images must be finite, in [0, 1] or [0, 255])")

    def _read_block(self, images, start, stop):
        errors = (OSError, RuntimeError, ValueError)
        try:
            return images[start:stop]
        except errors as exc:
            def unreadable(k):
                try:
                    images[k:k + 1]
                except errors:
                    return True
                return False
            first = next((k for k in range(start, stop) if unreadable(k)), start)
            _fail(self.path, f"key 'images' samples {start}-{stop - 1} cannot be read, the first bad one "
                  f"is sample {first} ({exc}): the file is truncated or corrupt")

    def __len__(self):
        return self.n

    def read_images(self, indices):
        """Images of the given sample indices, in the given order, as uint8 (k, S, S, 3)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"{self.path}: sample indices must be in 0..{self.n - 1}")
        out = np.empty((indices.size, self.image_size, self.image_size, 3), dtype=np.uint8)
        if indices.size == 0:
            return out
        order = np.argsort(indices, kind="stable")
        wanted = indices[order]
        # HDF5 reads contiguous ranges fastest; split the sorted indices into runs.
        breaks = np.flatnonzero(np.diff(wanted) > 1) + 1
        pos = 0
        for run in np.split(wanted, breaks):
            start, stop = int(run[0]), int(run[-1]) + 1
            block = self._read_block(self._images, start, stop)
            if self._float_scale is not None:
                self._check_float(block, start, self._float_scale)
                block = np.rint(block * (255.0 / self._float_scale)).astype(np.uint8)
            rows = run - start
            # Duplicated indices appear more than once in `run`: take each row as often.
            out[order[pos:pos + len(run)]] = block[rows]
            pos += len(run)
        return out

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_catalog(path):
    """Open and validate an astroNN-format catalog; images stay on disk until read."""
    return Galaxy10File(path)
