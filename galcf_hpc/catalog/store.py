"""The catalog's HDF5 layout: one part file per work unit, one ``catalog.h5`` of virtual
datasets over all parts, and the check that the two fit together.

Every dataset has a fill value that a computed galaxy cannot have, because a virtual dataset
whose part file is missing silently reads as its fill value. ``key`` keeps HDF5's default
fill (empty bytes): h5py 3.16 writes garbage for an explicit fixed-length string fill value.
"""

import contextlib
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError
from ..fileio import atomic_path

FORMAT = "galcf-hpc-catalog/2"  # /2: z, luminance_share, validity_<judge>
CATALOG = "catalog.h5"
PARTS = "parts"
_COMPRESSION = {"compression": "gzip", "compression_opts": 1}
_VERIFY_BLOCK = 65536


def part_name(unit):
    return f"unit-{unit:06d}.h5"


def work_units(n, unit_size):
    """Contiguous (start, stop) ranges of the input order, ``unit_size`` galaxies each."""
    return [(s, min(s + unit_size, n)) for s in range(0, n, unit_size)]


def schema(key_length, num_classes, h_dim, z_dim, num_targets, image_size, image_dtype, judges=()):
    """name -> (per-galaxy shape, dtype, fill value or None for HDF5's default, description).
    ``judges``: names of the independent judges, one ``validity_<name>`` field each."""
    r, t = image_size, num_targets
    image_fill = 0 if image_dtype == "uint8" else np.nan
    fields = {
        "key": ((), f"S{key_length}", None, "sample key of the input (g<source index> for astroNN .h5)"),
        "ra": ((), "f8", -999.0, "right ascension, degrees; NaN if the input has none"),
        "dec": ((), "f8", -999.0, "declination, degrees; NaN if the input has none"),
        "label": ((), "i2", -32768, "true class from the input; -1 if the input has none"),
        "pred": ((), "i2", -32768, "predicted class (nearest class mean in h)"),
        "distance": ((num_classes,), "f4", -1.0, "Euclidean distance of h to every class mean"),
        "h": ((h_dim,), "f4", np.nan, "hidden-space vector h = F(z1)"),
        "z": ((z_dim,), "f4", np.nan, "latent z = E(x) = [z1, z2]"),
        "image": (
            (t, 3, r, r),
            image_dtype,
            image_fill,
            "counterfactual x_cf per target (CHW, [0,1] as float16 or x255 as uint8); "
            "for target == pred the reconstruction x~",
        ),
        "validity": (
            (t,),
            "i1",
            -128,
            "validity by the model (necessary, never sufficient: its decoder was "
            "trained against this encoder): 1 if the re-encoded x_cf is assigned the target, 0 if not, "
            "-1 where target == pred (no counterfactual)",
        ),
    }
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


def validity_field(judge):
    return f"validity_{judge}"


def validity_fields(fields):
    """The validity fields of a schema: the model's and every judge's."""
    return [name for name in fields if name == "validity" or name.startswith("validity_")]


@contextlib.contextmanager
def part_writer(path, n, fields, attrs):
    """Yield ``write(offset, arrays)`` into a new part file of ``n`` galaxies; the file
    appears under ``path`` only when the block ends without error."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, (shape, dtype, _, _) in fields.items():
                # Images one galaxy per chunk (read galaxy by galaxy); the small columns of a
                # part are one chunk each.
                chunks = (1,) + shape if name == "image" else (n,) + shape
                f.create_dataset(name, (n,) + shape, dtype, chunks=chunks, **_COMPRESSION)
            f.attrs.update(attrs)

            def write(offset, arrays):
                for name, values in arrays.items():
                    f[name][offset : offset + len(values)] = values

            yield write


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


def check_parts(out_dir, units, fields):
    """Problems (strings) with the part files: missing, unreadable or of the wrong shape."""
    problems = []
    for unit, (start, stop) in enumerate(units):
        path = Path(out_dir) / PARTS / part_name(unit)
        where = f"{path} (galaxies {start}-{stop - 1})"
        if not path.is_file():
            problems.append(f"{where} is missing")
            continue
        try:
            with h5py.File(path, "r") as f:
                if (int(f.attrs["unit"]), int(f.attrs["start"]), int(f.attrs["stop"])) != (unit, start, stop):
                    problems.append(
                        f"{where} holds unit {int(f.attrs['unit'])} ({int(f.attrs['start'])}-"
                        f"{int(f.attrs['stop']) - 1}) of another layout"
                    )
                for name, (shape, dtype, _, _) in fields.items():
                    ds = f.get(name)
                    if ds is None or ds.shape != (stop - start,) + shape or ds.dtype != np.dtype(dtype):
                        got = "missing" if ds is None else f"{ds.shape} {ds.dtype}"
                        problems.append(
                            f"{where}: dataset '{name}' is {got}, expected {(stop - start,) + shape} {np.dtype(dtype)}"
                        )
        except (OSError, KeyError) as exc:
            problems.append(f"{where} cannot be read ({exc})")
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
            if name == "image":
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
    return attrs


def pack_catalog(catalog_path, out_path, block=_VERIFY_BLOCK):
    """Copy a (verified) virtual ``catalog.h5`` into one self-contained file with contiguous
    storage per field (same names, shapes, chunking per galaxy, compression and attributes),
    written under a temporary name and renamed: a single file to archive or move without
    its parts. Returns the number of galaxies."""
    with h5py.File(catalog_path, "r") as src, atomic_path(Path(out_path)) as tmp:
        with h5py.File(tmp, "w") as dst:
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
            dst.attrs.update(src.attrs)
            dst.attrs["packed_from"] = str(Path(catalog_path).resolve())
            return len(src["key"])
