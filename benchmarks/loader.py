"""Loader throughput: images/s of the torch, DALI and synthetic back-ends on the same shards.

    python3 benchmarks/loader.py [--shards DIR] [--size 256] [--threads 2] [--device cpu]

Without ``--shards`` it renders a synthetic Galaxy10-like catalog at ``--size`` px with GalSim
(``--galaxies`` of them, PNG shards as ``galcf-hpc data shard`` writes them) into a cache
directory and reuses it on later runs. Every back-end reads the training split with the
paper's augmentation (rotation, central crop 0.7, resize to ``--image-size``) and batch size
``--batch-size``; after ``--warmup`` batches, ``--batches`` batches are timed, ``--repeats``
times, and the median is reported. torch runs ``--threads`` DataLoader worker processes (one
intra-op thread each), DALI a pipeline with ``--threads`` CPU threads; synthetic hands out
batches made once on the device (the ceiling: no data work at all).

Prints a table and the ratios to the torch back-end, and writes them as JSON (``--out``).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from galcf_hpc.loaders.dali import DaliLoader  # noqa: E402
from galcf_hpc.loaders.synthetic import SyntheticLoader  # noqa: E402
from galcf_hpc.loaders.torch import build_torch_loader  # noqa: E402


def make_shards(root, galaxies, size, workers):
    from galcf_hpc.data.galaxy10 import write_catalog
    from galcf_hpc.data.shards import write_shards
    from galcf_hpc.data.synth import generate

    out = root / "shards"
    if (out / "splits.json").is_file():
        return out
    print(f"rendering {galaxies} galaxies at {size} px into {root} (once; reused later)", flush=True)
    cat = generate(galaxies, size, seed=11, workers=workers)
    write_catalog(
        root / "catalog.h5", cat["images"], cat["ans"], cat["ra"], cat["dec"], cat["redshift"], cat["pxscale"]
    )
    write_shards(root / "catalog.h5", out, shard_size=200, fractions=(0.9, 0.05, 0.05), seed=0)
    return out


def time_loader(make, warmup, batches, repeats):
    """Median images/s over ``repeats`` timed windows of ``batches`` batches (after warm-up)."""
    loader = make()
    rates = []
    it = iter(loader)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    for _ in range(warmup):
        next_batch()
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            b = next_batch()
            n += b["images"].shape[0]
        if b["images"].is_cuda:
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    loader.close()
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": rates}


def _dali_stage_pipeline(split, stage, batch_size, image_size, device):
    """The DALI pipeline of the back-end cut after ``stage`` (read, decode, rotate, crop+resize, layout)."""
    from nvidia.dali import fn, pipeline_def, types

    from galcf_hpc.loaders.augment import crop_box
    from galcf_hpc.loaders.split import open_split

    manifest, shards = open_split(split)
    anchor, side = crop_box(manifest["image_size"], 0.7)

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=0 if device == "gpu" else None)
    def pipe():
        enc, _ = fn.readers.webdataset(
            paths=[str(t) for t, _, _ in shards],
            index_paths=[str(i) for _, i, _ in shards],
            ext=[manifest["image_format"], "cls"],
            random_shuffle=True,
            pad_last_batch=True,
        )
        if stage == "read":
            return enc
        img = fn.decoders.image(enc, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        if stage == "decode":
            return img
        img = fn.rotate(img, angle=fn.random.uniform(range=[-180, 180]), keep_size=True, fill_value=0)
        if stage == "rotate":
            return img
        img = fn.resize(
            img,
            size=[image_size, image_size],
            roi_start=[anchor, anchor],
            roi_end=[anchor + side, anchor + side],
            antialias=True,
            dtype=types.FLOAT,
        )
        if stage == "crop+resize":
            return img
        return fn.crop_mirror_normalize(img, mean=0.0, std=255.0, output_layout="CHW", dtype=types.FLOAT)

    p = pipe()
    p.build()
    return p


def profile_stages(split, batch_size, image_size, device, batches=4):
    """Milliseconds per image of each stage, one CPU thread, for both real back-ends."""
    from galcf_hpc.loaders.augment import crop_resize, rotate, sample_angles, to_float_chw
    from galcf_hpc.loaders.torch import ShardDataset

    out = {"dali": {}, "torch": {}}
    previous = 0.0
    for stage in ("read", "decode", "rotate", "crop+resize", "layout"):
        p = _dali_stage_pipeline(split, stage, batch_size, image_size, device)
        p.run()
        t0 = time.perf_counter()
        for _ in range(batches):
            p.run()
        total = (time.perf_counter() - t0) * 1000 / (batches * batch_size)
        out["dali"][stage] = total - previous
        previous = total
        del p
    ds = ShardDataset(split)
    n = batches * batch_size
    t0 = time.perf_counter()
    raw = torch.from_numpy(__import__("numpy").stack([ds[i]["image"] for i in range(n)]))
    t1 = time.perf_counter()
    x = to_float_chw(raw)
    t2 = time.perf_counter()
    x = rotate(x, sample_angles(ds.keys[:n], 0, 0, 180.0))
    t3 = time.perf_counter()
    crop_resize(x, 0.7, image_size).clamp_(0, 1)
    t4 = time.perf_counter()
    ds.close()
    out["torch"] = {
        "read+decode": (t1 - t0) * 1000 / n,
        "to float": (t2 - t1) * 1000 / n,
        "rotate": (t3 - t2) * 1000 / n,
        "crop+resize": (t4 - t3) * 1000 / n,
    }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, help="existing shard directory (default: render one)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "galcf-bench-loader")
    ap.add_argument("--galaxies", type=int, default=600)
    ap.add_argument("--size", type=int, default=256, help="cutout size of rendered shards")
    ap.add_argument("--image-size", type=int, default=256, help="model input size after crop and resize")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="DALI and synthetic device")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also time each stage on one thread")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_loader.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    shards = args.shards or make_shards(
        args.cache / f"{args.size}px-{args.galaxies}", args.galaxies, args.size, args.threads
    )
    split = shards / "train"
    common = dict(batch_size=args.batch_size, image_size=args.image_size, train=True)
    runs = {
        f"torch ({args.threads} workers)": lambda: build_torch_loader(
            split, augment=True, num_workers=args.threads, **common
        ),
        f"dali-{args.device} ({args.threads} threads)": lambda: DaliLoader(
            split, augment=True, num_threads=args.threads, device=args.device, **common
        ),
        f"synthetic ({args.device})": lambda: SyntheticLoader(
            split, device="cuda" if args.device == "gpu" else "cpu", **common
        ),
    }
    results = {}
    for name, make in runs.items():
        results[name] = time_loader(make, args.warmup, args.batches, args.repeats)
        print(
            f"{name:28s} {results[name]['images_per_s']:9.1f} images/s "
            f"(min {results[name]['min']:.1f}, max {results[name]['max']:.1f})",
            flush=True,
        )
    base = next(iter(results.values()))["images_per_s"]
    print("\nratio to the torch back-end:")
    for name, r in results.items():
        r["ratio_to_torch"] = r["images_per_s"] / base
        print(f"  {name:28s} {r['ratio_to_torch']:6.2f}x")
    if args.profile:
        report_profile = profile_stages(split, args.batch_size, args.image_size, args.device)
        print("\nms per image and stage, one thread:")
        for backend, stages in report_profile.items():
            print(
                f"  {backend:6s} "
                + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
                + f"; total {sum(stages.values()):.2f}"
            )
        results["profile_ms_per_image"] = report_profile
    report = {
        "benchmark": "loader",
        "shards": str(shards),
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
