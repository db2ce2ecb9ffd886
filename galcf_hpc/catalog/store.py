"""The catalog's HDF5 layout: one part file per work unit, one ``catalog.h5`` of virtual
datasets over all parts, and the check that the two fit together.

Every dataset has a fill value that a computed galaxy cannot have, because a virtual dataset
whose part file is missing silently reads as its fill value. ``key`` keeps HDF5's default
fill (empty bytes): h5py 3.16 writes garbage for an explicit fixed-length string fill value.

A missing part is worse than a hole when the reader's current directory holds another
catalog: HDF5 looks for a relative source file first in ``$HDF5_VDS_PREFIX``, then next to
``catalog.h5``, and last relative to the current directory, where it finds that catalog's
``parts/unit-NNNNNN.h5`` and reads its rows without a word (a dataset access property's
virtual prefix is only tried before the catalog's folder, it never removes the last step).
So every reader here first checks, with :func:`check_sources`, that each part file the
virtual datasets name exists next to ``catalog.h5`` (and ``catalog verify`` that it is a
valid part of this very catalog) before it reads through them.
"""

import contextlib
import io
import json
import math
import multiprocessing
import os
import re
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError
from ..fileio import atomic_path, move_aside

FORMAT = "galcf-hpc-catalog/3"  # /3: prob, margin, mislabel_score, images optional
CATALOG = "catalog.h5"
PARTS = "parts"
_COMPRESSION = {"compression": "gzip", "compression_opts": 1}
_VERIFY_BLOCK = 65536
# catalog.h5 attributes that verify and pack read; a file without one is not a whole catalog
REQUIRED_ATTRS = (
    "checkpoint",
    "checkpoint_sha256",
    "judges_dir",
    "judge_names",
    "judge_sha256",
    "input",
    "input_fingerprint",
    "num_galaxies",
    "unit_size",
    "targets",
    "images",
    "image_dtype",
    "image_size",
    "decode_batch",
    "margin",
    "placement",
)
# attributes every part file carries (see part_attrs), checked at every start
PART_RECORD = (
    "unit",
    "start",
    "stop",
    "checkpoint_sha256",
    "judges",
    "targets",
    "input_fingerprint",
    "input_sha256",
    "precision",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def part_name(unit):
    return f"unit-{unit:06d}.h5"


def part_attrs(unit, start, stop, run, input_sha256, **extra):
    """The attributes of a part file: its unit and rows, what it was computed with (``run``:
    checkpoint_sha256, judges {name: sha256}, targets, input_fingerprint, as in run.json, and
    the precision of its model pass: bf16 or fp32), and the sha256 of its rows of the input (see
    ``source.unit_sha256``)."""
    return {
        "unit": unit,
        "start": start,
        "stop": stop,
        "checkpoint_sha256": run["checkpoint_sha256"],
        "judges": json.dumps(run["judges"], sort_keys=True),
        "targets": np.asarray(run["targets"], np.int16),
        "input_fingerprint": run["input_fingerprint"],
        "input_sha256": input_sha256,
        "precision": run["precision"],
        **extra,
    }


def work_units(n, unit_size):
    """Contiguous (start, stop) ranges of the input order, ``unit_size`` galaxies each."""
    return [(s, min(s + unit_size, n)) for s in range(0, n, unit_size)]


# default_unit_size: see its docstring and docs/catalog.md, "At survey scale"
UNITS_PER_RANK = 8
MAX_PARTS = 1024
MIN_UNIT_SIZE = 256
MAX_UNIT_SIZE = 32768
MAX_PART_BYTES = 512 * 2**20
_MIN_BATCH = 32


def default_unit_size(num_galaxies, ranks, fields=None):
    """Galaxies per work unit (and part file) for ``num_galaxies`` galaxies on ``ranks``
    ranks, a power of two: the largest that still gives every rank ``UNITS_PER_RANK`` (8)
    units, raised where that would make more than ``MAX_PARTS`` (1024) parts, and kept
    between ``MIN_UNIT_SIZE`` (256) and ``MAX_UNIT_SIZE`` (32768); given the schema
    ``fields``, lowered (not below 32) until one part, which the job builds in memory, holds
    at most ``MAX_PART_BYTES`` (512 MiB) uncompressed.

    Load balance wants many units per rank: units are handed out on request, so at the end
    a rank waits for at most the one unit another rank is still computing; with 8 units per
    rank that tail is about 1/16 of the run. Everything else wants few units. Each is a file
    that ``catalog run`` (at every start), ``verify`` and ``export`` open one by one
    (milliseconds each), and ``catalog.h5`` holds one mapping per part and field. Above all,
    HDF5 keeps every part file open that a reader has read through ``catalog.h5``, and past
    the open-file limit (``ulimit -n``, 1024 on many systems) it returns the rows of the
    parts it cannot open as fill values without an error: a plain h5py read of a whole
    column of 8.67 million galaxies in units of 256 (34,000 parts) is silently wrong. So
    at most 1024 parts, even if a rank then gets fewer than 8 units (from 67 ranks on for
    8.67 million galaxies; the tail is still at most one unit). Above 32768 nothing is
    gained (265 parts for 8.67 million galaxies; verify then spends its time decompressing
    values), while a killed job loses up to a unit per rank and reading one galaxy
    decompresses its unit's chunk of a field (32 MiB of z at 32768). 256 (the job's former
    fixed default) keeps small inputs as they were. Powers of two are multiples of every
    power-of-two ``explain.batch_size`` up to 256, so GPU batches need no padding.

    Examples: Galaxy10 DECaLS (17,736) on 4 ranks: 512 (35 parts); Galaxy Zoo DESI (8.67
    million) on 2 to 33 ranks: 32768 (265 parts), on 64 ranks 16384 (530), on 256 ranks
    16384 (530: 2 per rank, not 2117 parts); with full 256 px images of 9 targets (1.8 MB
    per galaxy): 256."""
    size = max(1, num_galaxies // (UNITS_PER_RANK * max(1, ranks)))
    size = 1 << (size.bit_length() - 1)  # largest power of two <= size
    few = -(-num_galaxies // MAX_PARTS)  # the smallest unit with at most MAX_PARTS parts
    size = max(size, 1 << (few - 1).bit_length() if few > 1 else 1)
    size = min(max(size, MIN_UNIT_SIZE), MAX_UNIT_SIZE)
    if fields is not None:
        cap = max(_MIN_BATCH, MAX_PART_BYTES // max(1, _galaxy_bytes(fields)))
        size = min(size, 1 << (cap.bit_length() - 1))
    return size


def _galaxy_bytes(fields):
    """Uncompressed bytes of one galaxy's row over every field of a schema."""
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype, _, _ in fields.values())


IMAGE_MODES = ("none", "thumbnails", "full")


# --images auto stores full images while they take at most this many bytes (uint8, before
# compression): Galaxy10 DECaLS's test split (1774 galaxies) at 256 px with 9 targets is 3.1 GB,
# Galaxy Zoo DESI's 8.67 million galaxies 15 TB (0.96 TB at 64 px)
AUTO_FULL_IMAGE_BYTES = 4 * 2**30


def default_images(num_galaxies, num_targets, image_size):
    """``--images auto``: ``full`` while the counterfactual images of the whole input take
    at most ``AUTO_FULL_IMAGE_BYTES`` as uint8, else ``none`` (every image can be rendered
    again from z and h: ``catalog render``)."""
    size = num_galaxies * num_targets * 3 * image_size**2
    return "full" if size <= AUTO_FULL_IMAGE_BYTES else "none"


def thumbnail_size(image_size):
    """Side of the browsing thumbnails stored with ``--images thumbnails``: a quarter of the
    model's input side, at least 16 px (64 px for the paper's 256 px model)."""
    return min(image_size, max(16, image_size // 4))


def schema(key_length, num_classes, h_dim, z_dim, num_targets, image_size, image_dtype, judges=(), images="full"):
    """name -> (per-galaxy shape, dtype, fill value or None for HDF5's default, description).
    ``judges``: names of the independent judges, one ``validity_<name>`` field each.
    ``images``: ``full`` stores every counterfactual at the model's size (``image``),
    ``thumbnails`` at :func:`thumbnail_size` (``thumbnail``, uint8), ``none`` no image:
    ``catalog render`` recomputes any of them from z, h and the checkpoint."""
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {IMAGE_MODES}, got {images!r}")
    r, t = image_size, num_targets
    image_fill = 0 if image_dtype == "uint8" else np.nan
    fields = {
        "key": ((), f"S{key_length}", None, "sample key of the input (g<source index> for astroNN .h5)"),
        "ra": ((), "f8", -999.0, "right ascension, degrees; NaN if the input has none"),
        "dec": ((), "f8", -999.0, "declination, degrees; NaN if the input has none"),
        "label": ((), "i2", -32768, "class label from the input (the catalogue's); -1 if the input has none"),
        "pred": ((), "i2", -32768, "predicted class (nearest class mean in h)"),
        "prob": (
            (num_classes,),
            "f4",
            -1.0,
            "class probabilities: posterior of the Gaussian mixture in h (softmax of -||h - mu_c||^2 / 2)",
        ),
        "margin": ((), "f4", -1.0, "top-2 margin: probability of the predicted class minus the second's"),
        "mislabel_score": (
            (),
            "f4",
            -1.0,
            "distance of h to the mean of the label's class minus the distance to the nearest "
            "class mean (>= 0; 0 where pred == label, large: the label is doubtful); NaN without a label",
        ),
        "distance": ((num_classes,), "f4", -1.0, "Euclidean distance of h to every class mean"),
        "h": ((h_dim,), "f4", np.nan, "hidden-space vector h = F(z1)"),
        "z": ((z_dim,), "f4", np.nan, "latent z = E(x) = [z1, z2]"),
    }
    if images == "full":
        fields["image"] = (
            (t, 3, r, r),
            image_dtype,
            image_fill,
            "counterfactual x_cf per target (CHW, [0,1] as float16 or x255 as uint8); "
            "for target == pred the reconstruction x~",
        )
    elif images == "thumbnails":
        s = thumbnail_size(image_size)
        fields["thumbnail"] = (
            (t, 3, s, s),
            "u1",
            0,
            f"counterfactual x_cf per target reduced to {s} px (area average; CHW, x255 as uint8); for "
            "target == pred the reconstruction x~; `galcf-hpc catalog render` gives the full size",
        )
    fields["validity"] = (
        (t,),
        "i1",
        -128,
        "validity by the model (necessary, never sufficient: its decoder was "
        "trained against this encoder): 1 if the re-encoded x_cf is assigned the target, 0 if not, "
        "-1 where target == pred (no counterfactual)",
    )
    for name in judges:
        fields[validity_field(name)] = (
            (t,),
            "i1",
            -128,
            f"validity by judge '{name}' (an independent classifier nothing in training "
            "optimised against): 1 if it assigns x_cf to the target, 0 if not, -1 where target == pred",
        )
    fields.update(
        {
            "msd": ((t,), "f4", -1.0, "mean squared difference x_cf vs x~; NaN where target == pred"),
            "ssim": ((t,), "f4", -2.0, "SSIM x_cf vs x~ (skimage defaults); NaN where target == pred"),
            "luminance_share": (
                (t,),
                "f4",
                -1.0,
                "share of the energy of x_cf - x~ in its band-mean (luminance) "
                "part, in [0, 1] (0: pure recolouring); NaN where target == pred or x_cf == x~",
            ),
        }
    )
    return fields


IMAGE_FIELDS = ("image", "thumbnail")
_CLASS_AXIS = ("prob", "distance")
_COMPONENT_AXIS = ("h", "z")
_TARGET_AXIS = ("msd", "ssim", "luminance_share", *IMAGE_FIELDS)


def field_axis(name):
    """What the second axis of a catalog field counts: ``"class"`` (one value per class, in
    the order of the attribute ``class_names``), ``"target"`` (per target, attribute
    ``target_names``), ``"component"`` (vector components of h or z), or None for a
    per-galaxy scalar."""
    if name in _CLASS_AXIS:
        return "class"
    if name in _COMPONENT_AXIS:
        return "component"
    if name in _TARGET_AXIS or name == "validity" or name.startswith("validity_"):
        return "target"
    return None


def validity_field(judge):
    return f"validity_{judge}"


def validity_fields(fields):
    """The validity fields of a schema: the model's and every judge's."""
    return [name for name in fields if name == "validity" or name.startswith("validity_")]


@contextlib.contextmanager
def part_writer(path, n, fields, attrs):
    """Yield ``write(offset, arrays)`` into a new part file of ``n`` galaxies; the file
    appears under ``path`` only when the block ends without error.

    The part is built in memory (compressed: one unit's worth) and written to disk in one
    piece. HDF5 itself cannot report a failed write of a chunk (h5py prints it while
    releasing the dataset and carries on), so a disk or quota that fills up while a part is
    written is one OSError here: a DataError naming the part, and never a part with missing
    data under its final name."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for name, (shape, dtype, _, _) in fields.items():
            # Images one galaxy per chunk (read galaxy by galaxy); the small columns of a
            # part are one chunk each.
            chunks = (1,) + shape if name in IMAGE_FIELDS else (n,) + shape
            f.create_dataset(name, (n,) + shape, dtype, chunks=chunks, **_COMPRESSION)
        f.attrs.update(attrs)

        def write(offset, arrays):
            for name, values in arrays.items():
                f[name][offset : offset + len(values)] = values

        yield write
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except OSError as exc:
        raise _write_failed(path, exc) from exc


def _write_failed(path, exc):
    return DataError(
        f"writing catalog part {path} failed ({exc}); nothing was written under its name and the parts "
        "finished before it are intact. Free space (or quota) and rerun the same command: it resumes"
    )


def write_catalog_file(out_dir, units, fields, attrs):
    """``catalog.h5``: a virtual dataset per field over every part, provenance as attributes.

    The mappings go straight into the dataset creation property list (one hyperslab of the
    virtual dataspace per unit, and one source dataspace shared by all units of the same
    size): h5py's ``layout[start:stop] = VirtualSource(...)`` builds selection objects per
    mapping, a minute for the 34,000 units x 17 fields of 8.67 million galaxies in units of
    256."""
    n = units[-1][1]
    with atomic_path(Path(out_dir) / CATALOG) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, (shape, dtype, fill, description) in fields.items():
                layout = h5py.VirtualLayout((n,) + shape, dtype)
                virtual = h5py.h5s.create_simple((n,) + shape)
                sources = {}
                for unit, (start, stop) in enumerate(units):
                    virtual.select_hyperslab((start,) + (0,) * len(shape), (stop - start,) + shape)
                    if stop - start not in sources:
                        sources[stop - start] = h5py.h5s.create_simple((stop - start,) + shape)
                    # Relative paths: HDF5 resolves them against the catalog's own folder, so the
                    # output directory can be moved as a whole.
                    layout.dcpl.set_virtual(
                        virtual, f"{PARTS}/{part_name(unit)}".encode(), name.encode(), sources[stop - start]
                    )
                ds = f.create_virtual_dataset(name, layout, fillvalue=fill)
                ds.attrs["description"] = description
            f.attrs.update(attrs)


def _missing(name, values, fill):
    if fill is None:
        return values == b""
    if isinstance(fill, float) and np.isnan(fill):
        return np.isnan(values)
    return values == np.asarray(fill, dtype=values.dtype)


def part_problem(path, unit, start, stop, fields, run):
    """Why the file ``path`` is not a finished part of unit ``unit`` (rows ``start:stop``)
    of the catalog run ``run`` (checkpoint_sha256, judges, targets, input_fingerprint, as in
    run.json): (reason, text), or None if it is one. Reads attributes and dataset shapes,
    never values, so it is cheap enough for every part at every start. The sha256 of the
    part's rows of the input is only checked for presence here; comparing it needs those
    rows read again (:func:`check_parts` with ``unit_sha256``)."""
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            missing = [k for k in PART_RECORD if k not in a]
            if missing:
                return "unrecorded", (
                    f"lacks the attribute(s) {', '.join(missing)} (written by an older galcf-hpc, or not "
                    "by `catalog run`)"
                )
            got = (int(a["unit"]), int(a["start"]), int(a["stop"]))
            if got != (unit, start, stop):
                return "layout", (
                    f"holds unit {got[0]} (galaxies {got[1]}-{got[2] - 1}) of another layout, not unit "
                    f"{unit} (galaxies {start}-{stop - 1})"
                )
            extra = sorted(set(f) - set(fields))
            if extra:
                return "schema", f"has dataset(s) {', '.join(extra)} that this catalog does not have"
            for name, (shape, dtype, _, _) in fields.items():
                ds = f.get(name)
                if not isinstance(ds, h5py.Dataset) or ds.shape != (stop - start,) + shape or ds.dtype != dtype:
                    found = "missing" if ds is None else f"{getattr(ds, 'shape', 'a group')} {getattr(ds, 'dtype', '')}"
                    return "schema", (
                        f"dataset '{name}' is {found}, expected {(stop - start,) + shape} {np.dtype(dtype)}"
                    )
            if a["checkpoint_sha256"] != run["checkpoint_sha256"]:
                return "checkpoint", (
                    f"was computed with a checkpoint of sha256 {a['checkpoint_sha256']}, this catalog's is "
                    f"{run['checkpoint_sha256']} (a part of another catalog)"
                )
            judges = json.loads(a["judges"])
            if judges != dict(run["judges"]):
                return "judges", f"was judged by {judges}, this catalog by {dict(run['judges'])}"
            if [int(t) for t in np.atleast_1d(a["targets"])] != [int(t) for t in run["targets"]]:
                return "targets", f"has targets {list(a['targets'])}, this catalog {list(run['targets'])}"
            if a["input_fingerprint"] != run["input_fingerprint"]:
                return "input", (
                    f"was computed from input {a['input_fingerprint']!r}, this catalog's input is "
                    f"{run['input_fingerprint']!r}"
                )
            if "precision" in run and a["precision"] != run["precision"]:
                return "precision", (
                    f"was computed in {a['precision']}, this catalog computes in {run['precision']} (another "
                    "kind of device, or train.bf16/train.cpu_bf16 changed)"
                )
            if not (isinstance(a["input_sha256"], str) and _SHA256.fullmatch(a["input_sha256"])):
                return "unrecorded", f"attribute 'input_sha256' is {a['input_sha256']!r}, not a sha256"
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return "unreadable", f"cannot be read as a part file ({exc})"
    return None


def reject_part(path, reason):
    """Move a part file that is not (or no longer) a valid part aside, never deleting it:
    ``unit-NNNNNN.h5`` -> ``unit-NNNNNN.h5.rejected-<reason>`` (``-2``, ``-3``, ... when that
    name is taken). Returns the new path."""
    return move_aside(path, f"rejected-{reason}")


def rejected_parts(out_dir):
    """Part files moved aside by :func:`reject_part` that are still there."""
    return sorted((Path(out_dir) / PARTS).glob("unit-*.h5.rejected-*"))


def check_parts(out_dir, units, fields, run, unit_sha256=None, progress=None):
    """(path, problem) of every bad part file: missing, unreadable, of another layout or
    schema, computed with another checkpoint, judges, targets or input (see
    :func:`part_problem`), and, given ``unit_sha256(start, stop)`` of the input, computed
    from other rows of the input than the input holds now. ``progress(done, total)`` after
    every part."""
    problems = []
    for unit, (start, stop) in enumerate(units):
        if progress is not None and unit:
            progress(unit, len(units))
        path = Path(out_dir) / PARTS / part_name(unit)
        where = f"{path} (galaxies {start}-{stop - 1})"
        if not path.is_file():
            problems.append((path, f"{where} is missing"))
            continue
        bad = part_problem(path, unit, start, stop, fields, run)
        if bad:
            problems.append((path, f"{where} {bad[1]}"))
        elif unit_sha256 is not None:
            with h5py.File(path, "r") as f:
                recorded = f.attrs["input_sha256"]
            if unit_sha256(start, stop) != recorded:
                problems.append(
                    (
                        path,
                        f"{where} was computed from other galaxies than rows {start}-{stop - 1} of the input "
                        "now (its input_sha256 differs): a part of another catalog of a look-alike input, or "
                        f"the input changed in place; move it aside (mv {path} {path}.rejected-input-rows) and "
                        "rerun `galcf-hpc catalog run` with the same arguments to recompute it",
                    )
                )
    if progress is not None:
        progress(len(units), len(units))
    return problems


def _vds_prefix_problem():
    prefix = os.environ.get("HDF5_VDS_PREFIX")
    if prefix:
        return (
            f"the environment variable HDF5_VDS_PREFIX is set ({prefix!r}): HDF5 would look for part "
            "files there before the catalog's own parts/; unset it"
        )
    return None


def check_sources(catalog, folder):
    """Problems with the files the virtual datasets of an open ``catalog`` read from: each
    must be a relative name of an existing file inside ``folder`` (the catalog's own
    directory). Relative names that do not exist there would be looked up in the current
    directory by HDF5 (see the module's docstring)."""
    problems, seen = [], set()
    prefix = _vds_prefix_problem()
    if prefix:
        problems.append(prefix)
    for name, ds in catalog.items():
        if not (isinstance(ds, h5py.Dataset) and ds.is_virtual):
            continue
        for source in ds.virtual_sources():
            file_name = source.file_name
            if file_name == "." or file_name in seen:
                continue
            seen.add(file_name)
            if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
                problems.append(f"dataset '{name}' reads from {file_name}, outside the catalog's directory")
            elif not (Path(folder) / file_name).is_file():
                problems.append(f"{Path(folder) / file_name} is missing")
    return problems


def check_mapping(catalog, units, fields):
    """Problems with the virtual datasets of an open ``catalog``: every field present and
    mapped, rows ``start:stop`` of unit u, to the same dataset of ``parts/unit-u.h5``."""
    problems = []
    n = units[-1][1] if units else 0
    expected = {(f"{PARTS}/{part_name(u)}", (start, stop)) for u, (start, stop) in enumerate(units)}
    for name, (shape, dtype, _, _) in fields.items():
        ds = catalog.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.shape != (n,) + shape or ds.dtype != dtype:
            found = "missing" if ds is None else f"{getattr(ds, 'shape', 'a group')} {getattr(ds, 'dtype', '')}"
            problems.append(f"dataset '{name}' of {CATALOG} is {found}, expected {(n,) + shape} {np.dtype(dtype)}")
            continue
        if not ds.is_virtual:
            problems.append(f"dataset '{name}' of {CATALOG} is not a virtual dataset over the parts")
            continue
        mapped = set()
        for source in ds.virtual_sources():
            rows = source.vspace.get_select_bounds()
            mapped.add((source.file_name, (int(rows[0][0]), int(rows[1][0]) + 1)))
            if source.dset_name.lstrip("/") != name:
                problems.append(f"dataset '{name}' of {CATALOG} reads dataset '{source.dset_name}' of a part")
                break
        if mapped != expected:
            problems.append(
                f"dataset '{name}' of {CATALOG} does not map rows start:stop of every unit to "
                f"{PARTS}/{part_name(0)}, ... ({len(mapped)} sources, {len(expected)} units)"
            )
    return problems


# part files one open virtual dataset may have read from before verify and pack reopen it.
# HDF5 keeps every part file open that a virtual dataset has read, until the dataset is
# closed; past the open-file limit (ulimit -n: often 1024) it reads the parts it cannot open
# as fill values, without an error
_OPEN_PARTS = 128
_MAX_VALUE_WORKERS = 8
_PACK_BYTES = 64 * 2**20


def _row_blocks(units, rows):
    """(start, stop, parts) of consecutive units grouped into blocks of at least ``rows``
    galaxies or ``_OPEN_PARTS`` units (the last may be shorter). Blocks end on unit
    boundaries: each field of a part is one chunk, and a block that split a unit would
    decompress that chunk twice."""
    blocks, first = [], 0
    for i, (_, stop) in enumerate(units):
        if stop - units[first][0] >= rows or i + 1 - first >= _OPEN_PARTS or i == len(units) - 1:
            blocks.append((units[first][0], stop, i + 1 - first))
            first = i + 1
    return blocks


class _RowChecker:
    """Checks blocks of rows of an open ``catalog.h5``, reading through its virtual datasets:
    per block, (fill values, validity inconsistent with pred, keys). Datasets stay open from
    block to block (opening one decodes all its mappings) but are reopened after
    ``_OPEN_PARTS`` part files, so that no more part files are held open than that."""

    def __init__(self, catalog, fields, targets):
        self.catalog, self.targets = catalog, np.asarray(targets)
        self.fills = {name: fill for name, (_, _, fill, _) in fields.items() if name not in IMAGE_FIELDS}
        self.validity = validity_fields(fields)
        self.datasets, self.parts = {}, 0

    def __call__(self, block):
        start, stop, parts = block
        if not self.datasets or self.parts + parts > _OPEN_PARTS:
            self.datasets = {}  # closes the datasets, and so the part files they hold open
            self.datasets = {name: self.catalog[name] for name in self.fills}
            self.parts = 0
        self.parts += parts
        fills, invalid, kept = {}, {}, {}
        # image fill values can be real pixels; a hole shows in every other field
        for name, fill in self.fills.items():
            values = self.datasets[name][start:stop]
            rows = np.flatnonzero(_missing(name, values, fill).reshape(len(values), -1).any(1))
            if len(rows):
                fills[name] = (len(rows), start + int(rows[0]))
            if name in ("key", "pred") or name in self.validity:
                kept[name] = values
        own = kept["pred"][:, None] == self.targets[None]
        for name in self.validity:
            rows = np.flatnonzero(((kept[name] == -1) != own).any(1))
            if len(rows):
                invalid[name] = (len(rows), start + int(rows[0]))
        return fills, invalid, kept["key"]


_WORKER_CHECKER = None


def _start_row_checker(path, fields, targets):
    global _WORKER_CHECKER
    _WORKER_CHECKER = _RowChecker(h5py.File(path, "r"), fields, targets)


def _check_rows(block):
    return _WORKER_CHECKER(block)


def _value_workers(workers, blocks):
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(_MAX_VALUE_WORKERS, cpus) if blocks >= 4 else 1
    # fork, not spawn: spawn would import the caller's __main__ again in every worker. The
    # catalog is closed before the fork; files the caller holds open are inherited, untouched
    return max(1, min(workers, blocks)) if "fork" in multiprocessing.get_all_start_methods() else 1


def check_values(catalog, fields, targets, units=None, workers=None, block=_VERIFY_BLOCK):
    """Problems with the values read through the virtual datasets of ``catalog`` (the path of
    ``catalog.h5``, or an open one): fill values (a part that is missing or was never
    written), duplicate keys, validity inconsistent with pred. Returns (problems, keys as an
    array of fixed-length bytes).

    Reads blocks of about ``block`` galaxies that end on the boundaries of ``units`` (the
    parts' rows as checked by :func:`check_mapping`; fixed blocks without). Given a path,
    ``workers`` processes (default: the CPUs this process may use, at most 8, for 4 blocks
    or more; forked, each with its own handle of ``catalog.h5``) read the blocks in
    parallel: decompressing the values is most of the time (13.5 GB for 8.67 million
    galaxies without images). An open file is read in this process only."""
    own = not isinstance(catalog, h5py.File)
    f = h5py.File(catalog, "r") if own else catalog
    try:
        n = f["pred"].shape[0]
        if units:
            blocks = _row_blocks(units, block)
        else:  # parts unknown: fixed blocks, and the datasets reopened for every block
            blocks = [(start, stop, _OPEN_PARTS) for start, stop in work_units(n, block)]
        workers = _value_workers(workers, len(blocks)) if own else 1
        if workers > 1:
            f.close()
            context = multiprocessing.get_context("fork")
            with context.Pool(workers, _start_row_checker, (catalog, fields, targets)) as pool:
                results = pool.map(_check_rows, blocks, chunksize=1)
        else:
            checker = _RowChecker(f, fields, targets)
            results = [checker(b) for b in blocks]
            checker.datasets = {}
    finally:
        if own:
            f.close()
    fills, invalid = {}, {}
    for block_fills, block_invalid, _ in results:
        for found, block_found in ((fills, block_fills), (invalid, block_invalid)):
            for name, (count, first) in block_found.items():
                total, earliest = found.get(name, (0, first))
                found[name] = (total + count, min(earliest, first))
    problems = [
        f"'{name}' holds its fill value {fields[name][2]!r} for {count} galaxies, first index {first}: their part "
        "file is missing or incomplete"
        for name, (count, first) in fills.items()
    ]
    problems += [
        f"'{name}' is -1 somewhere other than where target == pred ({count} galaxies, first index {first})"
        for name, (count, first) in invalid.items()
    ]
    keys = np.concatenate([k for _, _, k in results]) if results else np.zeros(0, fields["key"][1])
    count, example = duplicate_keys(keys)
    if count:
        problems.append(f"{count} keys appear more than once, e.g. {example!r}")
    return problems, keys


def duplicate_keys(keys):
    """(how many distinct keys appear more than once, one of them as bytes or None) of an
    array of fixed-length bytes. Sorts 64-bit hashes of the keys (0.5 s for 8.67 million
    keys; ``np.unique`` takes 2.7 s over the fixed-length bytes, 6.4 s over them as Python
    objects) and compares the keys behind equal hashes exactly: a collision costs a
    comparison, never a wrong answer."""
    keys = np.ascontiguousarray(keys)
    if len(keys) < 2:
        return 0, None
    width = keys.dtype.itemsize
    raw = keys.view(np.uint8).reshape(len(keys), width)
    if width % 8:
        raw = np.concatenate([raw, np.zeros((len(keys), 8 - width % 8), np.uint8)], axis=1)
    digest = np.full(len(keys), 0xCBF29CE484222325, np.uint64)
    for word in np.ascontiguousarray(raw).view(np.uint64).T:
        digest = (digest ^ word) * np.uint64(0x100000001B3)
        digest ^= digest >> np.uint64(29)
    ordered = np.sort(digest)
    same = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(same):
        return 0, None
    unique, counts = np.unique(keys[np.isin(digest, same)], return_counts=True)
    repeated = unique[counts > 1]
    return len(repeated), (bytes(repeated[0]) if len(repeated) else None)


def read_attrs(path):
    """Attributes of ``catalog.h5``; DataError if it is missing or not a catalog."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: the catalog job has not finished; rerun "
            "`galcf-hpc catalog run` with the same arguments"
        )
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as exc:
        raise DataError(
            f"{path} cannot be opened as HDF5 ({exc}); rerun `galcf-hpc catalog run` "
            "with the same arguments to rewrite it"
        ) from None
    found = attrs.get("format")
    if isinstance(found, str) and found.startswith("galcf-hpc-catalog/") and found != FORMAT:
        raise DataError(
            f"{path}: catalog format {found!r}, this version reads {FORMAT!r}; rerun `galcf-hpc "
            "catalog run` into a new --out to write it in the current format"
        )
    if found != FORMAT:
        raise DataError(
            f"{path}: attribute 'format' is {attrs.get('format')!r}, expected {FORMAT!r}; not a galcf-hpc catalog"
        )
    for key in REQUIRED_ATTRS:
        if key not in attrs:
            raise DataError(
                f"{path}: attribute '{key}' is missing, so the catalog cannot be checked; rerun `galcf-hpc "
                "catalog run` with the same arguments to rewrite it"
            )
    return attrs


def repair_hint(catalog_dir):
    """What to do about a catalog with missing or bad parts."""
    return (
        f"check it with `galcf-hpc catalog verify {catalog_dir}` and rerun `galcf-hpc catalog run` with the "
        "same arguments to recompute the missing or bad parts"
    )


def pack_catalog(catalog_path, out_path, block=_VERIFY_BLOCK, progress=None):
    """Copy a (verified) virtual ``catalog.h5`` into one self-contained file with real
    storage per field (same names, shapes, dtypes, fill values and attributes; images
    chunked per galaxy, the other fields in chunks of about ``block`` values, a power of two
    of galaxies; gzip, with HDF5's byte shuffle before it for numbers wider than a byte:
    8 % smaller, and faster to decompress), written under a temporary name and renamed: a
    single file to archive or move without its parts. Returns the number of galaxies;
    DataError, and nothing written, if a part file that the virtual datasets read from is
    not in the catalog's directory. ``progress(done, total)`` counts galaxies x fields
    copied.

    Fields are copied in reads of whole units (attribute ``unit_size``) of about
    ``_PACK_BYTES`` and at most ``_OPEN_PARTS`` parts: a part holds each field as one chunk,
    which a read of part of a unit would decompress again for every read (hours for units
    of 32768 galaxies), and past the open-file limit HDF5 reads parts as fill values."""
    catalog_path = Path(catalog_path)
    with h5py.File(catalog_path, "r") as src:
        problems = check_sources(src, catalog_path.parent)
    if problems:
        raise DataError(
            f"{catalog_path}: not packed: {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}; {repair_hint(catalog_path.parent)}"
        )
    try:
        with h5py.File(catalog_path, "r") as src, atomic_path(Path(out_path)) as tmp:
            with h5py.File(tmp, "w") as dst:
                total, done = sum(ds.shape[0] for ds in src.values()), 0
                unit = int(src.attrs.get("unit_size", 1)) or 1
                for name in list(src):
                    ds = src[name]
                    n, shape, dtype = ds.shape[0], ds.shape[1:], ds.dtype
                    values, row_bytes = max(1, int(np.prod(shape))), max(1, ds.dtype.itemsize * int(np.prod(shape)))
                    if ds.ndim > 2:  # images: one galaxy per chunk, as in the parts
                        chunks, step = (1,) + shape, max(1, min(_PACK_BYTES // row_bytes, _OPEN_PARTS * unit))
                    else:
                        chunk = min(n, 1 << (max(1, block // values).bit_length() - 1))
                        chunks = (chunk,) + shape
                        # reads of whole units, of at most _OPEN_PARTS parts (the open-file limit)
                        # and about _PACK_BYTES; of whole chunks too where that fits
                        limit = _OPEN_PARTS * unit
                        whole = math.lcm(unit, chunk)
                        whole = whole if whole <= limit and whole * row_bytes <= 4 * _PACK_BYTES else unit
                        step = max(whole, min(_PACK_BYTES // row_bytes, limit) // whole * whole)
                    out = dst.create_dataset(
                        name,
                        ds.shape,
                        dtype,
                        chunks=chunks,
                        fillvalue=ds.fillvalue,
                        shuffle=dtype.kind in "fiu" and dtype.itemsize > 1,
                        **_COMPRESSION,
                    )
                    out.attrs.update(ds.attrs)
                    del ds
                    for start in range(0, n, step):
                        # the virtual dataset opened for each read: an open one holds every part
                        # file it has read from open (see _OPEN_PARTS)
                        out[start : start + step] = src[name][start : start + step]
                        done += min(step, n - start)
                        if progress is not None:
                            progress(done, total, name)
                dst.attrs.update(src.attrs)
                dst.attrs["packed_from"] = str(catalog_path.resolve())
                return len(src["key"])
    except OSError as exc:  # a part damaged after it was checked, or the output not writable
        raise DataError(
            f"{catalog_path}: not packed into {out_path} ({exc}); check the catalog with `galcf-hpc catalog "
            f"verify {catalog_path.parent}` and that {Path(out_path).parent} is writable"
        ) from None
