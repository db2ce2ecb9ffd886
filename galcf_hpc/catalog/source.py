"""Inputs of the catalog job, read in contiguous ranges of their natural order: an
astroNN-format .h5 (file order), a shard split directory (shard order), a folder of cutout
files (sorted by path) and a list of cutout files (.csv or .parquet, list order).

All give every rank the same ``keys`` (cheap: generated for .h5, from the DALI index files
for shards, from the file names or the list for cutouts) and read images, labels and sky
positions only for the range asked for, so a catalog of any size is never loaded whole.

Two fingerprints identify the input: ``fingerprint`` of the whole input (cheap, compared
when a run resumes), and :meth:`unit_sha256` of one unit's rows as stored (reads those
rows; written into every part file and compared by ``catalog verify``).
"""

import csv
import hashlib
import json
import math
import os
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..data.classes import NUM_CLASSES, class_index
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


# ---------------------------------------------------------------------------------------
# Cutout files, as the Galaxy Zoo and Legacy Survey cutout services deliver them: a folder
# of them (FolderSource) or a list of them (ListSource)

# longest first, so that x.fits.gz is a FITS file and not a .gz one
CUTOUT_EXTENSIONS = (".fits.gz", ".fit.gz", ".fits", ".fit", ".png", ".jpeg", ".jpg")
_FITS_EXTENSIONS = (".fits.gz", ".fit.gz", ".fits", ".fit")
ACCEPTED = (
    "pass a shard split directory (e.g. shards/test), an astroNN-format .h5 catalog, a folder of "
    "cutouts (.png, .jpg, .jpeg, .fits, .fits.gz, .fit) or a list of cutout files (.csv or .parquet "
    "with a column 'path')"
)
_REDO = (
    "replace it with a readable image or take it out of the input, then run the catalog into a new "
    "--out (the input has changed, so this run cannot be resumed)"
)

# The Legacy Survey viewer's colour mapping of g, r, z images in nanomaggies (legacysurvey/
# imagine, map/views.py: sdss_rgb with the scales of dr2_rgb), a colour-preserving asinh
# stretch after Lupton et al. (2004), so that a FITS cutout looks like the viewer's JPEG
# cutout of the same galaxy.
FITS_BANDS = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}  # band: (plane 0 R, 1 G, 2 B; scale)
FITS_SOFTENING = 0.03  # m, added to every scaled band
FITS_Q = 20.0  # asinh softening of the mean intensity


def fits_to_rgb(planes, bands):
    """uint8 [H, W, 3] of band images ``planes`` [B, H, W] (nanomaggies) named ``bands`` (each
    g, r or z), by the Legacy Survey viewer's mapping:

        v_b = s_b x_b + m                       s_g = 6.0, s_r = 3.4, s_z = 2.2, m = 0.03
        I   = mean over b of max(v_b, 0)
        c_b = clip(v_b asinh(Q I) / (sqrt(Q) I), 0, 1)     Q = 20; c_b = 0 where I = 0

    z in R, r in G, g in B, each as round(255 c_b). A single band is grey: its c_b in all three
    planes. Non-finite pixels (masked, outside the survey) count as no flux."""
    x = np.nan_to_num(np.asarray(planes, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    v = np.stack([x[i] * FITS_BANDS[b][1] + FITS_SOFTENING for i, b in enumerate(bands)])
    intensity = np.maximum(v, 0).mean(axis=0)
    gain = np.divide(
        np.arcsinh(FITS_Q * intensity) / math.sqrt(FITS_Q),
        intensity,
        out=np.zeros_like(intensity),
        where=intensity > 0,
    )
    c = np.rint(255 * np.clip(v * gain, 0, 1)).astype(np.uint8)
    if len(bands) == 1:
        return np.repeat(c[0][..., None], 3, axis=2)
    rgb = np.empty(c.shape[1:] + (3,), np.uint8)
    for i, band in enumerate(bands):
        rgb[..., FITS_BANDS[band][0]] = c[i]
    return rgb


def pil_to_rgb(img):
    """uint8 [H, W, 3] of a decoded PIL image: RGB as it is; grey in all three planes (16-bit
    grey scaled by 255/65535); with transparency (RGBA, LA, a palette or colour with a
    transparent entry) composited onto black, round(c alpha / 255): a transparent pixel holds
    no light, and an opaque one is unchanged."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.clip(np.rint(np.asarray(img, np.float64) / 257), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"), np.uint16)
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)
    return np.asarray(img.convert("RGB"))


def square_resize(image, side):
    """The centre square of ``image`` [H, W, 3] (side min(H, W)), resized to ``side`` x ``side``
    with PIL's Lanczos filter (antialiased: its kernel widens by the reduction factor) unless it
    has that size already."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = image[top : top + s, left : left + s]
    if s == side:
        return image
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(resized)


def _cutout_extension(name):
    lowered = name.lower()
    return next((ext for ext in CUTOUT_EXTENSIONS if lowered.endswith(ext) and len(lowered) > len(ext)), None)


def _fits_band(header, i, default):
    band = str(header.get(f"BAND{i}", header.get("BAND", "") if i == 0 else "")).strip().lower()
    return band or default


def _decode_fits(path):
    """uint8 [H, W, 3] of a FITS cutout: the first HDU with a 2-D image (grey) or a cube of
    1 or 3 bands (bands first; band names from the BAND0-BAND2 keys as the Legacy Survey
    writes them, else g, r, z), mapped by :func:`fits_to_rgb`, top row first (FITS stores
    the bottom row first)."""
    try:
        from astropy.io import fits  # only FITS users pay for importing astropy
    except ImportError:
        raise DataError(
            f"{path}: reading FITS cutouts needs astropy; pip install astropy (or pip install "
            "'galcf-hpc[cutouts]'), or convert the cutouts to PNG"
        ) from None
    with fits.open(path, memmap=False) as hdus:
        hdu = next((h for h in hdus if h.is_image and h.data is not None and h.data.ndim in (2, 3)), None)
        if hdu is None:
            raise ValueError("no HDU holds a 2-D image or a 3-D cube")
        data, header = np.asarray(hdu.data, np.float64), hdu.header
    if data.ndim == 2 or data.shape[0] == 1:
        band = _fits_band(header, 0, "r")
        planes, bands = data.reshape((1,) + data.shape[-2:]), [band if band in FITS_BANDS else "r"]
    elif data.shape[0] == 3:
        bands = [_fits_band(header, i, "grz"[i]) for i in range(3)]
        if sorted(bands) != ["g", "r", "z"]:
            raise ValueError(
                f"a cube of bands {', '.join(bands)} (header BAND0-BAND2): only g, r, z cubes have a "
                "colour mapping here; make RGB PNGs of other bands yourself"
            )
        planes = data
    else:
        raise ValueError(
            f"data of shape {data.shape}: expected a 2-D image or a cube of 3 bands, bands first (g, r, z)"
        )
    return fits_to_rgb(planes[:, ::-1], bands)


def _decode(path):
    """uint8 [H, W, 3] of one cutout file, by its extension; raises what its decoder raises."""
    if path.name.lower().endswith(_FITS_EXTENSIONS):
        return _decode_fits(path)
    with Image.open(path) as img:
        img.load()
        return pil_to_rgb(img)


class _Cutouts:
    """Rows that are cutout files, one image each: what FolderSource and ListSource share.

    ``files`` are the rows' files, ``names`` what the fingerprint records of each (its path as
    given: relative to the folder, or as written in the list)."""

    kind = None  # first word of the fingerprint
    missing = "restore it, or run the catalog into a new --out without it"  # what to do about a missing file

    def __init__(self, path, files, names, keys, labels=None, ra=None, dec=None):
        self.path = Path(path)
        self.files, self._names, self.keys = files, names, keys
        self.n = len(keys)
        self.labels = np.full(self.n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        self.ra = np.full(self.n, np.nan) if ra is None else np.asarray(ra, np.float64)
        self.dec = np.full(self.n, np.nan) if dec is None else np.asarray(dec, np.float64)
        self._fingerprint = None
        self._side = None

    def _error(self, i, text, todo):
        return DataError(f"{self.files[i]}: {text}; {todo}")

    def _os_error(self, i, exc):
        if isinstance(exc, FileNotFoundError):
            return self._error(i, "does not exist", self.missing)
        return self._error(i, f"cannot be read ({exc.strerror or exc})", "check its permissions")

    def _fingerprint_head(self, digest):
        """What identifies the input besides its files (the list file for ListSource)."""

    @property
    def fingerprint(self):
        """sha256 over (for a list: the list file's bytes, then) per row its file's path as given,
        size and mtime: no image is read. Computed at first use, which in the catalog job is on
        rank 0 only (one stat per file, not one per file and rank)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            self._fingerprint_head(digest)
            for i, name in enumerate(self._names):
                try:
                    st = os.stat(self.files[i])
                except OSError as exc:
                    raise self._os_error(i, exc) from None
                _feed(
                    digest,
                    name.encode(),
                    st.st_size.to_bytes(8, "little"),
                    st.st_mtime_ns.to_bytes(8, "little", signed=True),
                )
            self._fingerprint = f"{self.kind}:{self.n}:{digest.hexdigest()}"
        return self._fingerprint

    def unit_sha256(self, start, stop):
        """sha256 over rows ``start:stop`` as stored: per row its key, label (int64), ra and dec
        (float64, little-endian) and the raw bytes of its file. Raw bytes, not decoded images:
        cheap to read again, and independent of the decoder (JPEG decoders differ)."""
        digest = hashlib.sha256()
        labels, ra, dec = self.labels.astype("<i8"), self.ra.astype("<f8"), self.dec.astype("<f8")
        for i in range(start, stop):
            try:
                raw = self.files[i].read_bytes()
            except OSError as exc:
                raise self._os_error(i, exc) from None
            _feed(digest, self.keys[i].encode(), labels[i].tobytes(), ra[i].tobytes(), dec[i].tobytes(), raw)
        return digest.hexdigest()

    def _image(self, i):
        try:
            image = _decode(self.files[i])
        except DataError:
            raise
        except (FileNotFoundError, PermissionError) as exc:  # other OSErrors of PIL are bad data
            raise self._os_error(i, exc) from None
        except Exception as exc:  # PIL and astropy raise many types for corrupt data
            fmt = "FITS" if self.files[i].name.lower().endswith(_FITS_EXTENSIONS) else "an image"
            raise self._error(i, f"cannot be decoded as {fmt} ({exc})", _REDO) from None
        if min(image.shape[:2]) == 0:
            raise self._error(i, f"holds an empty image ({image.shape[1]}x{image.shape[0]} pixels)", _REDO)
        return image

    @property
    def image_size(self):
        """Side of every image read: the first row's (its shorter side). Decodes that one file."""
        if self._side is None:
            self._side = min(self._image(0).shape[:2])
        return self._side

    def read(self, start, stop):
        side = self.image_size
        return {
            "images": np.stack([square_resize(self._image(i), side) for i in range(start, stop)]),
            "keys": self.keys[start:stop],
            "labels": self.labels[start:stop].copy(),
            "ra": self.ra[start:stop].copy(),
            "dec": self.dec[start:stop].copy(),
        }

    def close(self):
        pass  # files are opened per read


def _walk_cutouts(folder):
    """Relative POSIX paths of the cutout files under ``folder`` and its subfolders (names that
    start with '.' skipped, symbolic links to folders not followed), sorted by their parts,
    and how many other files there were."""

    def fail(exc):
        raise DataError(f"{exc.filename}: cannot be listed ({exc.strerror}); check its permissions")

    found, others = [], 0
    for root, dirs, files in os.walk(folder, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            if _cutout_extension(name):
                found.append(PurePosixPath(Path(root, name).relative_to(folder).as_posix()))
            else:
                others += 1
    return [p.as_posix() for p in sorted(found, key=lambda p: p.parts)], others


def _ascii_key(key, where):
    if not key.isascii():
        raise DataError(
            f"{where}: its key {key!r} is not ASCII, and the catalog stores keys as ASCII; rename the "
            "file, or list the cutouts in a .csv with an ASCII 'id' column"
        )
    return key


class FolderSource(_Cutouts):
    """Every cutout file (.png, .jpg, .jpeg, .fits, .fits.gz, .fit) under a folder and its
    subfolders, sorted by relative path; key = the relative path without extension. No labels
    (-1), no positions (NaN)."""

    kind = "folder"

    def __init__(self, folder):
        folder = Path(folder)
        names, others = _walk_cutouts(folder)
        if not names:
            raise DataError(
                f"{folder}: no cutout files ({', '.join(CUTOUT_EXTENSIONS)}) in it or its subfolders "
                f"({others} other file(s)); a shard split directory needs its manifest.json (run "
                f"`galcf-hpc data verify {folder.parent}`); {ACCEPTED}"
            )
        keys, first = [], {}
        for name in names:
            key = _ascii_key(name[: -len(_cutout_extension(name))], folder / name)
            if key in first:
                raise DataError(
                    f"{folder / first[key]} and {folder / name} both have key {key!r} (the path without "
                    "extension), and keys must be unique; rename or remove one of them"
                )
            first[key] = name
            keys.append(key)
        super().__init__(folder, [folder / name for name in names], names, keys)


def _cell(value):
    """A Parquet value as the text a CSV would hold."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value) if isinstance(value, float) else str(value)


def _read_list(path):
    """(column names as written, rows as lists of text, line of each row or None) of a .csv
    (UTF-8, blank lines skipped) or .parquet list."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional: only .parquet lists need it
        except ImportError:
            raise DataError(
                f"{path}: reading a .parquet list needs pyarrow; pip install pyarrow (or pip install "
                "'galcf-hpc[cutouts]'), or save the list as .csv"
            ) from None
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises its own types for damaged files
            raise DataError(f"{path}: cannot be read as Parquet ({exc}); write the list again") from None
        columns = [[_cell(v) for v in table.column(name).to_pylist()] for name in table.column_names]
        return table.column_names, [list(row) for row in zip(*columns)], None
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            rows, lines = [], []
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append(row)
                    lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot be read as a UTF-8 CSV list ({exc}); write it again") from None
    return header, rows, lines


def _position(text, low, high):
    if text.strip().lower() in ("", "nan"):
        return np.nan
    value = float(text)  # ValueError for text that is no number
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{text!r} is not in [{low:g}, {high:g}] degrees")
    return value


def _label(text):
    text = text.strip()
    if text.lower() in ("", "nan", "-1", "-1.0"):
        return -1
    try:
        return class_index(text)
    except ValueError:
        number = float(text)  # a class written as 3.0 (a column with missing values, from pandas)
        if number.is_integer():
            return class_index(int(number))
        raise


# optional columns of a list: (text -> value, what the text must be)
_LIST_VALUES = {
    "ra": (lambda text: _position(text, 0, 360), "a right ascension in degrees (0 to 360), or empty"),
    "dec": (lambda text: _position(text, -90, 90), "a declination in degrees (-90 to 90), or empty"),
    "label": (_label, f"a class 0-{NUM_CLASSES - 1} or a Galaxy10 class name, or empty"),
}


class ListSource(_Cutouts):
    """A list of cutout files: a .csv (or, with pyarrow, a .parquet) with a column ``path``
    (absolute, or relative to the list's folder) and optional ``id`` (the key; without it the
    path as written, without extension), ``ra``, ``dec`` (degrees) and ``label`` (0-9 or a
    Galaxy10 class name); other columns are ignored, column names are case-insensitive. Rows
    in list order."""

    kind = "list"
    missing = "fix the path (a relative one is read from the list's folder) or remove the row"

    def __init__(self, list_path):
        list_path = Path(list_path)
        folder = list_path.parent
        header, rows, self._lines = _read_list(list_path)
        column = {}
        for j, name in enumerate(header):
            name = str(name).strip().lower()
            if name in column:
                raise DataError(f"{list_path}: column '{name}' appears twice in the header; keep one")
            column[name] = j
        if "path" not in column:
            raise DataError(
                f"{list_path}: header (columns: {', '.join(map(str, header)) or 'none'}) has no column 'path'; "
                f"add one with each cutout's file (absolute, or relative to {folder})"
            )
        if not rows:
            raise DataError(
                f"{list_path}: no rows; add one row per cutout (columns path, and optional id, ra, dec, label)"
            )

        def bad(i, name, text):
            return DataError(f"{list_path}: {self._row(i)}, column '{name}': {text}")

        files, names, keys, labels, ra, dec, first = [], [], [], [], [], [], {}
        for i, row in enumerate(rows):
            if len(row) > len(header):
                raise DataError(
                    f"{list_path}: {self._row(i)} has {len(row)} values, the header {len(header)} columns; "
                    "quote values that hold a comma"
                )
            cells = {name: (row[j].strip() if j < len(row) else "") for name, j in column.items()}
            name = cells["path"]
            if not name:
                raise bad(i, "path", "is empty; give the cutout's file")
            extension = _cutout_extension(name)
            if extension is None:
                raise bad(
                    i,
                    "path",
                    f"{name!r} is not a cutout file ({', '.join(CUTOUT_EXTENSIONS)}); convert it or drop the row",
                )
            file = Path(name).expanduser()
            files.append(file if file.is_absolute() else folder / file)
            names.append(name)
            key_column = "id" if "id" in column else "path"
            key = cells["id"] if "id" in column else name[: -len(extension)]
            if not key:
                raise bad(i, "id", "is empty; give every row its own id")
            if not key.isascii():
                raise bad(
                    i, key_column, f"key {key!r} is not ASCII, and the catalog stores keys as ASCII; use an ASCII id"
                )
            if key in first:
                raise bad(
                    i,
                    key_column,
                    f"key {key!r} is also the key of {self._row(first[key])}; keys must be unique"
                    + ("" if "id" in column else " (add an 'id' column to tell the rows apart)"),
                )
            first[key] = i
            keys.append(key)
            for col, values in (("ra", ra), ("dec", dec), ("label", labels)):
                parse, hint = _LIST_VALUES[col]
                try:
                    values.append(parse(cells.get(col, "")))
                except ValueError:
                    raise bad(i, col, f"{cells[col]!r} is not {hint}; correct it") from None
        super().__init__(list_path, files, names, keys, labels, ra, dec)

    def _row(self, i):
        return f"row {i + 1}" + (f" (line {self._lines[i]})" if self._lines else "")

    def _error(self, i, text, todo):
        return DataError(f"{self.path}: {self._row(i)}, column 'path': {self.files[i]} {text}; {todo}")

    def _fingerprint_head(self, digest):
        _feed(digest, file_sha256(self.path).encode())


def open_source(path):
    """The catalog job's input at ``path``: a directory with manifest.json is a shard split,
    another directory a folder of cutouts; a .csv or .parquet file a list of cutouts, a .h5 or
    .hdf5 file an astroNN catalog."""
    path = Path(path)
    if path.is_dir():
        return ShardSource(path) if (path / "manifest.json").exists() else FolderSource(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".csv", ".parquet"):
            return ListSource(path)
        if suffix in (".h5", ".hdf5"):
            return H5Source(path)
        raise DataError(f"{path}: not an input the catalog job reads (by its extension); {ACCEPTED}")
    raise DataError(f"{path}: input does not exist; {ACCEPTED}")
