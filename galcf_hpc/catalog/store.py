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
    "image_dtype",
    "image_size",
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
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def part_name(unit):
    return f"unit-{unit:06d}.h5"


def part_attrs(unit, start, stop, run, input_sha256, **extra):
    """The attributes of a part file: its unit and rows, what it was computed with (``run``:
    checkpoint_sha256, judges {name: sha256}, targets, input_fingerprint, as in run.json)
    and the sha256 of its rows of the input (see ``source.unit_sha256``)."""
    return {
        "unit": unit,
        "start": start,
        "stop": stop,
        "checkpoint_sha256": run["checkpoint_sha256"],
        "judges": json.dumps(run["judges"], sort_keys=True),
        "targets": np.asarray(run["targets"], np.int16),
        "input_fingerprint": run["input_fingerprint"],
        "input_sha256": input_sha256,
        **extra,
    }


def work_units(n, unit_size):
    """Contiguous (start, stop) ranges of the input order, ``unit_size`` galaxies each."""
    return [(s, min(s + unit_size, n)) for s in range(0, n, unit_size)]


IMAGE_MODES = ("none", "thumbnails", "full")


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
    """``catalog.h5``: a virtual dataset per field over every part, provenance as attributes."""
    n = units[-1][1]
    with atomic_path(Path(out_dir) / CATALOG) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, (shape, dtype, fill, description) in fields.items():
                layout = h5py.VirtualLayout((n,) + shape, dtype)
                for unit, (start, stop) in enumerate(units):
                    # Relative paths: HDF5 resolves them against the catalog's own folder, so the
                    # output directory can be moved as a whole.
                    layout[start:stop] = h5py.VirtualSource(
                        f"{PARTS}/{part_name(unit)}", name, shape=(stop - start,) + shape, dtype=dtype
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


def check_values(catalog, fields, targets):
    """Problems with the values read through the virtual datasets: fill values (a part that
    is missing or was never written), duplicate keys, validity inconsistent with pred."""
    problems = []
    n = catalog["pred"].shape[0]
    keys = []
    for start in range(0, n, _VERIFY_BLOCK):
        stop = min(start + _VERIFY_BLOCK, n)
        for name, (_, _, fill, _) in fields.items():
            if name in IMAGE_FIELDS:
                continue  # image fill values can be real pixels; a hole shows in every other field
            values = catalog[name][start:stop]
            bad = _missing(name, values, fill)
            rows = np.flatnonzero(bad.reshape(len(values), -1).any(1))
            if len(rows):
                problems.append(
                    f"'{name}' holds its fill value {fill!r} for {len(rows)} galaxies, first "
                    f"index {start + rows[0]}: their part file is missing or incomplete"
                )
        keys.extend(catalog["key"][start:stop].tolist())
        pred = catalog["pred"][start:stop]
        own = pred[:, None] == np.asarray(targets)[None]
        for name in validity_fields(fields):
            if ((catalog[name][start:stop] == -1) != own).any():
                problems.append(
                    f"'{name}' is -1 somewhere other than where target == pred (galaxies {start}-{stop - 1})"
                )
    unique, counts = np.unique(np.asarray(keys, dtype=object), return_counts=True)
    if (counts > 1).any():
        problems.append(f"{int((counts > 1).sum())} keys appear more than once, e.g. {unique[counts > 1][0]!r}")
    return problems, [k.decode() for k in keys]


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
    """Copy a (verified) virtual ``catalog.h5`` into one self-contained file with contiguous
    storage per field (same names, shapes, chunking per galaxy, compression and attributes),
    written under a temporary name and renamed: a single file to archive or move without
    its parts. Returns the number of galaxies; DataError, and nothing written, if a part file
    that the virtual datasets read from is not in the catalog's directory. ``progress(done,
    total)`` counts galaxies x fields copied."""
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
                for name, ds in src.items():
                    n = ds.shape[0]
                    step = max(1, block // max(1, int(np.prod(ds.shape[1:]))))
                    chunks = (1,) + ds.shape[1:] if ds.ndim > 2 else (min(n, step),) + ds.shape[1:]
                    out = dst.create_dataset(
                        name, ds.shape, ds.dtype, chunks=chunks, fillvalue=ds.fillvalue, **_COMPRESSION
                    )
                    out.attrs.update(ds.attrs)
                    for start in range(0, n, step):
                        out[start : start + step] = ds[start : start + step]
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
