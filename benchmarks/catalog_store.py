"""The catalog store at survey scale: files, bytes per galaxy and the time to assemble,
verify, read and export a catalog of Galaxy Zoo DESI's size (8.67 million galaxies), for
several layouts (galaxies per work unit and part file; optionally packed into one file).

Store layer only, no model: every part is written with the job's own writer
(``store.part_writer`` with ``store.part_attrs``) from synthetic values of the right ranges
(random floats do not compress, zeros would): Galaxy Zoo DESI-like keys (``dr8_<brick>_<obj>``),
sky positions in the DESI Legacy Surveys footprint, h scattered around ten class means,
distances, probabilities (softmax of -d^2/2, summing to 1), top-2 margin and mislabel score
(NaN where the label is -1, 30 % of galaxies), z, validities 0/1 and -1 exactly where
target == pred, MSD, SSIM and luminance share (NaN where target == pred). Schema: the
paper's model (``configs/galaxy10_decals.yaml``: h of ``model.z1_dim``, z of
``model.z_dim``), 9 targets, judges cnn, resnet, grey, ``images="none"``. Two worker
processes write the parts, taking units from a shared queue as two ranks would.
``run.json`` and the attributes of ``catalog.h5`` are what ``catalog run`` writes
(``job._catalog_attrs``) for a checkpoint, judges and input that are absent here, which
``catalog verify`` only notes.

Per layout, each in a fresh process: ``store.write_catalog_file`` (assemble),
``job.verify_catalog`` (verify), opening ``catalog.h5`` and reading one whole column
(``--column``; once more under ``ulimit -n 1024``, the open-file limit of many systems:
HDF5 keeps every part file open that a virtual dataset has read), Parquet export
(``galcf_hpc.catalog.export``, if present) and, for the unit sizes in ``--pack``,
``store.pack_catalog`` and a read of the packed file. The files were just written, so
reads mostly come from the page cache. A table goes to stdout, everything to ``--out``.

    nice python benchmarks/catalog_store.py --rows 200000 --layouts 256,4096,32768 --pack 32768
    nice python benchmarks/catalog_store.py --out results.json       # 8,670,000 rows

Data goes under ``--dir`` (default /tmp/galcf-store-bench), deleted layout by layout unless
``--keep``.
"""

import argparse
import cProfile
import hashlib
import importlib.util
import json
import multiprocessing
import os
import pstats
import resource
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from galcf_hpc import __version__
from galcf_hpc.catalog import store
from galcf_hpc.config import load_config
from galcf_hpc.data.classes import NUM_CLASSES

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "galaxy10_decals.yaml"
JUDGES = ("cnn", "resnet", "grey")
TARGETS = list(range(9))  # nine target classes
KEY_LENGTH = 24
UNLABELLED = 0.3  # share of galaxies without a label (-1): their mislabel_score is NaN
SEED = 20260


def fields_and_config():
    cfg = load_config(CONFIG)
    fields = store.schema(
        key_length=KEY_LENGTH,
        num_classes=NUM_CLASSES,
        h_dim=cfg.model.z1_dim,
        z_dim=cfg.model.z_dim,
        num_targets=len(TARGETS),
        image_size=256,
        image_dtype="uint8",
        judges=list(JUDGES),
        images="none",
    )
    return fields, cfg


def _sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def run_record(out_dir, rows, unit_size, cfg):
    """run.json as ``catalog run`` writes it, for a checkpoint, judges and input that do not
    exist here (verify notes that and checks the rest)."""
    return {
        "format": store.FORMAT,
        "version": __version__,
        "checkpoint": str(out_dir / "absent" / "checkpoints" / "step-00000000.pt"),
        "checkpoint_sha256": _sha("checkpoint"),
        "judges": {name: _sha(f"judge {name}") for name in JUDGES},
        "judges_dir": str(out_dir / "absent" / "judges"),
        "input": str(out_dir / "absent" / "gz_desi.h5"),
        "input_fingerprint": f"h5:{rows}x256px:{rows * 196608}B",
        "num_galaxies": rows,
        "unit_size": unit_size,
        "targets": TARGETS,
        "images": "none",
        "image_dtype": "uint8",
        "decode_batch": cfg.explain.batch_size,
        "key_length": KEY_LENGTH,
    }


def catalog_attrs(run, cfg, fields):
    """The attributes of catalog.h5: the job's own ``_catalog_attrs`` of this run."""
    from galcf_hpc.catalog import job

    return job._catalog_attrs(run, cfg, fields)


def galaxy_keys(start, stop):
    """Distinct Galaxy Zoo DESI-like ids, ``dr8_<brickid>_<objid>``."""
    return np.asarray(
        [f"dr8_{300000 + i // 2600}_{(i % 2600) * 3 + i % 3}" for i in range(start, stop)], f"S{KEY_LENGTH}"
    )


def synthetic_unit(fields, start, stop):
    """Every field of rows ``start:stop``, values of realistic range and entropy."""
    n, t = stop - start, np.asarray(TARGETS)
    h_dim, z_dim = fields["h"][0][0], fields["z"][0][0]
    means = np.random.default_rng(SEED).normal(0.0, 0.35, (NUM_CLASSES, h_dim))
    rng = np.random.default_rng([SEED, start])
    true = rng.integers(0, NUM_CLASSES, n)
    h = (means[true] + rng.normal(0.0, 1.0, (n, h_dim))).astype(np.float32)
    d2 = ((h[:, None, :].astype(np.float64) - means[None]) ** 2).sum(-1)
    distance = np.sqrt(d2).astype(np.float32)
    logit = -d2 / 2
    prob = np.exp(logit - logit.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    pred = distance.argmin(1)
    top2 = np.sort(prob, 1)[:, -2:]
    label = np.where(rng.random(n) < 0.85, true, rng.integers(0, NUM_CLASSES, n))
    label[rng.random(n) < UNLABELLED] = -1
    rows = np.arange(n)
    mislabel = np.where(label >= 0, distance[rows, np.maximum(label, 0)] - distance[rows, pred], np.nan)
    own = pred[:, None] == t[None]

    def validity(p):
        return np.where(own, -1, rng.random((n, len(t))) < p).astype(np.int8)

    def per_target(values):
        return np.where(own, np.nan, values).astype(np.float32)

    arrays = {
        "key": galaxy_keys(start, stop),
        "ra": rng.uniform(0.0, 360.0, n),
        "dec": np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-20)), np.sin(np.radians(85)), n))),
        "label": label.astype(np.int16),
        "pred": pred.astype(np.int16),
        "prob": prob.astype(np.float32),
        "margin": (top2[:, 1] - top2[:, 0]).astype(np.float32),
        "mislabel_score": mislabel.astype(np.float32),
        "distance": distance,
        "h": h,
        "z": rng.normal(0.0, 1.0, (n, z_dim)).astype(np.float32),
        "validity": validity(0.7),
        **{store.validity_field(name): validity(p) for name, p in zip(JUDGES, (0.5, 0.45, 0.3))},
        "msd": per_target(rng.lognormal(np.log(2e-3), 0.8, (n, len(t)))),
        "ssim": per_target(np.clip(rng.normal(0.85, 0.08, (n, len(t))), -1, 1)),
        "luminance_share": per_target(rng.beta(2.0, 3.0, (n, len(t)))),
    }
    assert set(arrays) == set(fields), set(arrays) ^ set(fields)
    return arrays


def _write_part(task):
    out_dir, unit, start, stop, run = task
    fields, _ = _WORKER["fields"]
    rows_sha = _sha(f"rows {start}-{stop}")  # the input is absent: verify cannot compare it
    attrs = store.part_attrs(unit, start, stop, run, rows_sha, device="synthetic", version=__version__)
    with store.part_writer(Path(out_dir) / store.PARTS / store.part_name(unit), stop - start, fields, attrs) as write:
        write(0, synthetic_unit(fields, start, stop))
    return stop - start


_WORKER = {}


def _init_worker(shuffle):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER["fields"] = fields_and_config()
    if shuffle:  # the --shuffle-parts experiment: what part_writer would write with shuffle=True
        store._COMPRESSION = {**store._COMPRESSION, "shuffle": True}


def write_parts(out_dir, units, run, workers, shuffle=False):
    (out_dir / store.PARTS).mkdir(parents=True)
    tasks = [(str(out_dir), u, start, stop, run) for u, (start, stop) in enumerate(units)]
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (shuffle,)) as pool:
        # one unit at a time from a shared queue, as ranks ask rank 0 for units
        for _ in pool.imap_unordered(_write_part, tasks, chunksize=1):
            pass


def directory_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------
# Measurements, each in a fresh process: python catalog_store.py --measure WHAT ARGS...


def _measure(what, args, profile=False):
    result = {}
    if what == "read" and len(args) > 2:  # the open-file limit of many systems (ulimit -n)
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(args[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    if what == "assemble":
        out_dir, unit_size = Path(args[0]), int(args[1])
        fields, cfg = fields_and_config()
        run = json.loads((out_dir / "run.json").read_text())
        units, attrs = store.work_units(run["num_galaxies"], unit_size), catalog_attrs(run, cfg, fields)
        call = partial(store.write_catalog_file, out_dir, units, fields, attrs)
    elif what == "verify":
        from galcf_hpc.catalog import job

        def call():
            result["notes"] = job.verify_catalog(args[0])["notes"]
    elif what == "read":
        import h5py

        def call():
            with h5py.File(args[0], "r") as f:
                ds = f[args[1]]
                values, fill = ds[:], ds.fillvalue
                # rows HDF5 could not read (a part file it could not open) come back as fill values
                result["fill_values"] = int((np.isnan(values) if np.isnan(fill) else values == fill).sum())
    elif what == "pack":
        call = partial(store.pack_catalog, args[0], args[1])
    elif what == "export":
        from galcf_hpc.catalog.export import export_catalog

        call = partial(export_catalog, args[0], args[1], "parquet")
    else:
        raise SystemExit(f"unknown measurement {what}")
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    try:
        if prof:
            prof.runcall(call)
        else:
            call()
    except Exception as exc:  # noqa: BLE001 - a failure is a result (e.g. too many open files)
        result["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    result["seconds"] = time.perf_counter() - t0
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(35)
    print(json.dumps(result))


def measure(what, *args, profile=False):
    """Run one measurement in a fresh process: {seconds, process_seconds, error if it failed}."""
    cmd = [sys.executable, __file__, "--measure", what, *map(str, args)] + (["--measure-profile"] if profile else [])
    for attempt in range(3):  # the package is edited by others meanwhile: an import may fail for a while
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if not res.returncode:
            break
        print(f"  {what} crashed (attempt {attempt + 1}):\n{res.stderr[-2000:]}", flush=True)
        time.sleep(60)
    else:
        return {"error": res.stderr[-300:], "seconds": wall, "process_seconds": wall, "load_average": None}
    if profile:
        print(f"--- profile of {what} {args}\n{res.stderr}", file=sys.stderr)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_seconds"], out["load_average"] = wall, os.getloadavg()[0]
    if "error" in out:
        print(f"  {what} failed after {out['seconds']:.1f} s: {out['error']}", flush=True)
    return out


def _time(result):
    return None if "error" in result else result["seconds"]


def part_field_bytes(part):
    """Stored bytes per galaxy of every field of one part file."""
    import h5py

    with h5py.File(part, "r") as f:
        n = f["key"].shape[0]
        return {name: ds.id.get_storage_size() / n for name, ds in f.items()}


def bench_layout(root, rows, unit_size, args):
    label = f"units of {unit_size}" + (", shuffle" if args.shuffle_parts else "")
    out_dir = root / f"units-{unit_size}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    run = run_record(out_dir, rows, unit_size, fields_and_config()[1])
    (out_dir / "run.json").write_text(json.dumps(run, indent=1))
    units = store.work_units(rows, unit_size)
    t0 = time.perf_counter()
    write_parts(out_dir, units, run, args.workers, args.shuffle_parts)
    row = {"rows": rows, "layout": label, "unit_size": unit_size, "parts": len(units)}
    row["write_parts_s"] = time.perf_counter() - t0
    print(f"[{label}] {len(units)} parts written in {row['write_parts_s']:.1f} s", flush=True)
    profile = unit_size in args.profile
    row["assemble_s"] = _time(measure("assemble", out_dir, unit_size, profile=profile))
    catalog = out_dir / store.CATALOG
    row["files"] = len(units) + 1
    row["catalog_h5_bytes"] = catalog.stat().st_size
    row["bytes"] = directory_bytes(out_dir) - (out_dir / "run.json").stat().st_size
    row["bytes_per_galaxy"] = row["bytes"] / rows
    row["field_bytes_per_galaxy"] = part_field_bytes(out_dir / store.PARTS / store.part_name(0))
    print(f"[{label}] assembled in {row['assemble_s']:.1f} s", flush=True)
    verify = measure("verify", out_dir, profile=profile)
    row["verify_s"], row["verify_notes"] = _time(verify), verify.get("notes", verify.get("error"))
    row["verify_load_average"] = verify["load_average"]
    print(f"[{label}] verified in {verify['seconds']:.1f} s (load average {verify['load_average']:.1f})", flush=True)
    read = measure("read", catalog, args.column, profile=profile)
    row["read_column_s"], row["read_column_process_s"] = _time(read), read["process_seconds"]
    row["read_column_error"], row["read_column_fill_values"] = read.get("error"), read.get("fill_values")
    print(f"[{label}] {args.column} read in {read['seconds']:.1f} s, {read.get('fill_values')} fill values", flush=True)
    read = measure("read", catalog, args.column, 1024)
    row["read_column_nofile_1024_s"], row["read_column_nofile_1024_error"] = _time(read), read.get("error")
    row["read_column_nofile_1024_fill_values"] = read.get("fill_values")
    print(f"[{label}] under ulimit -n 1024: {read['seconds']:.1f} s, {read.get('fill_values')} fill values", flush=True)
    row["export_parquet_s"] = None
    if unit_size in args.export and importlib.util.find_spec("galcf_hpc.catalog.export") is not None:
        parquet = root / f"units-{unit_size}.parquet"
        row["export_parquet_s"] = _time(measure("export", out_dir, parquet, profile=profile))
        if parquet.exists():
            row["parquet_bytes_per_galaxy"] = parquet.stat().st_size / rows
            parquet.unlink()
        print(f"[{label}] exported in {row['export_parquet_s']} s", flush=True)
    results = [row]
    if unit_size in args.pack:
        packed = root / f"units-{unit_size}-packed.h5"
        pack_s = _time(measure("pack", catalog, packed, profile=profile))
        read = measure("read", packed, args.column)
        packed_row = {
            "rows": rows,
            "layout": f"{label}, packed",
            "unit_size": unit_size,
            "parts": len(units),
            "files": 1,
            "bytes": packed.stat().st_size,
            "bytes_per_galaxy": packed.stat().st_size / rows,
            "pack_s": pack_s,
            "assemble_s": None if pack_s is None else row["assemble_s"] + pack_s,
            "verify_s": row["verify_s"],
            "read_column_s": _time(read),
            "read_column_process_s": read["process_seconds"],
            "export_parquet_s": None,
        }
        if unit_size in args.export and importlib.util.find_spec("galcf_hpc.catalog.export") is not None:
            parquet = root / "packed.parquet"
            packed_row["export_parquet_s"] = _time(measure("export", packed, parquet))
            parquet.unlink(missing_ok=True)
        results.append(packed_row)
        print(f"[{label}] packed in {pack_s} s", flush=True)
        packed.unlink()
    if not args.keep:
        shutil.rmtree(out_dir)
    return results


def _seconds(value):
    return "-" if value is None else f"{value:.1f}"


def _read(row):
    text = _seconds(row["read_column_s"])
    return text + (f" ({row['read_column_fill_values']:,} FILL)" if row.get("read_column_fill_values") else "")


def print_table(rows, column):
    print(
        f"\n{'rows':>9} | {'layout':<30} | {'files':>6} | {'bytes/galaxy':>12} | {'assemble s':>10} | "
        f"{'verify s':>8} | {'read ' + column + ' s':>20} | {'export s':>8}"
    )
    for r in rows:
        print(
            f"{r['rows']:>9,} | {r['layout']:<30} | {r['files']:>6} | {r['bytes_per_galaxy']:>12.0f} | "
            f"{_seconds(r['assemble_s']):>10} | {_seconds(r['verify_s']):>8} | {_read(r):>20} | "
            f"{_seconds(r['export_parquet_s']):>8}"
        )


def _units(text):
    return {int(u) for u in text.split(",") if u}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=8_670_000, help="galaxies (Galaxy Zoo DESI: 8,670,000)")
    p.add_argument("--layouts", default="256,4096,32768", help="unit sizes to compare, separated by commas")
    p.add_argument("--pack", default="", help="unit sizes whose catalog is also packed (store.pack_catalog)")
    p.add_argument("--export", default=None, help="unit sizes whose catalog is exported to Parquet (default: all)")
    p.add_argument("--workers", type=int, default=2, help="processes writing parts (as ranks would)")
    p.add_argument("--column", default="mislabel_score", help="the column read whole")
    p.add_argument("--dir", type=Path, default=Path("/tmp/galcf-store-bench"))
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the data of every layout")
    p.add_argument("--profile", default="", help="unit sizes whose measurements are profiled (to stderr)")
    p.add_argument(
        "--shuffle-parts",
        action="store_true",
        help="experiment: parts written with HDF5's byte shuffle before gzip (part_writer does not do that)",
    )
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--measure-profile", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.measure:
        return _measure(args.measure, rest, profile=args.measure_profile)
    layouts = [int(u) for u in args.layouts.split(",")]
    args.profile, args.pack = _units(args.profile), _units(args.pack)
    args.export = set(layouts) if args.export is None else _units(args.export)
    args.dir.mkdir(parents=True, exist_ok=True)
    results = []
    for unit_size in layouts:
        results += bench_layout(args.dir, args.rows, unit_size, args)
        print_table(results, args.column)
        machine = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "h5py": _h5py_version()}
        if args.out:
            args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    if importlib.util.find_spec("galcf_hpc.catalog.export") is None:
        print("export: galcf_hpc.catalog.export does not exist yet, not timed")


def _h5py_version():
    import h5py

    return f"h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}"


if __name__ == "__main__":
    main()
