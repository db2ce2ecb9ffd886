"""Loader throughput: images/s of the torch and DALI back-ends against the decoders alone.

    python3 benchmarks/loader.py [--shards DIR] [--size 256] [--image-sizes 256 64 32]
        [--threads 2] [--device cpu] [--baseline REV] [--profile] [--out F.json]

Without ``--shards`` it renders a synthetic Galaxy10-like catalog at ``--size`` px with GalSim
(``--galaxies`` of them, shards as ``galcf-hpc data shard`` writes them) into a cache
directory and reuses it on later runs. For every model input size of ``--image-sizes`` each
back-end reads the training split with the paper's augmentation (rotation, central crop 0.7,
resize) and batch size ``--batch-size``; after ``--warmup`` batches, ``--batches`` batches
are timed, ``--repeats`` times, and the median is reported. torch runs ``--threads``
DataLoader worker processes (one intra-op thread each), DALI a pipeline with ``--threads``
CPU threads; synthetic hands out batches made once on the device (no data work at all).

The decode-only ceiling is measured in the same run with the same threads: DALI's reader and
decoder alone, and the torch back-end's reader and Pillow decode alone. Each back-end is
reported as a fraction of its own decoder's ceiling: what the augmentation and the batching
leave of the decode rate.

``--baseline REV`` measures the back-ends of an earlier commit too (a git worktree of REV,
imported in a child process) on the same shards, in the same run: before and after.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _package_root(argv):
    """The tree whose ``galcf_hpc`` this process imports: ``--package-from DIR`` (the child of
    ``--baseline``) or this repository."""
    if "--package-from" in argv:
        return Path(argv[argv.index("--package-from") + 1]).resolve()
    return Path(__file__).resolve().parents[1]


sys.path.insert(0, str(_package_root(sys.argv)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from galcf_hpc.loaders.dali import DaliLoader  # noqa: E402
from galcf_hpc.loaders.synthetic import SyntheticLoader  # noqa: E402
from galcf_hpc.loaders.torch import ShardDataset, build_torch_loader  # noqa: E402


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
            n += len(b["images"])
        if torch.is_tensor(b["images"]) and b["images"].is_cuda:
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    loader.close()
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": rates}


def _dali_decode_pipeline(split, batch_size, threads, device, stage="decode"):
    """DALI's reader (``stage="read"``) or reader and decoder of the back-end's pipeline, nothing after."""
    from nvidia.dali import fn, pipeline_def, types

    from galcf_hpc.loaders.split import open_split

    manifest, shards = open_split(split)

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=0 if device == "gpu" else None)
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
        return fn.decoders.image(enc, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    return p


class _DaliDecodeOnly:
    def __init__(self, split, batch_size, threads, device):
        self.pipe = _dali_decode_pipeline(split, batch_size, threads, device)

    def __iter__(self):
        while True:
            (images,) = self.pipe.run()
            yield {"images": images}

    def close(self):
        self.pipe = None


def _decode_only(dataset, indices):
    # decode and drop: the ceiling is the decoder's rate, not the hand-over of full-size
    # images between processes (the back-ends hand over model-size batches)
    return {"images": np.array([dataset[i]["image"].shape[0] for i in indices])}


def _torch_decode_only(split, batch_size, threads):
    """The torch back-end's reader and Pillow decode in ``threads`` worker processes, no augmentation."""
    dataset = ShardDataset(split)
    plans = [list(range(i, i + batch_size)) for i in range(0, len(dataset) - batch_size + 1, batch_size)]
    loader = torch.utils.data.DataLoader(
        plans,
        batch_size=None,
        num_workers=threads,
        collate_fn=lambda indices: _decode_only(dataset, indices),
        persistent_workers=threads > 0,
    )
    loader.close = lambda: dataset.close()
    return loader


def measure(split, image_sizes, args, ceiling=True):
    """{label: images/s record} for every back-end and model input size (and the ceilings)."""
    results = {}
    common = dict(batch_size=args.batch_size, train=True)
    if ceiling:
        results["decode only: dali"] = time_loader(
            lambda: _DaliDecodeOnly(split, args.batch_size, args.threads, args.device),
            args.warmup,
            args.batches,
            args.repeats,
        )
        results["decode only: torch (Pillow)"] = time_loader(
            lambda: _torch_decode_only(split, args.batch_size, args.threads), args.warmup, args.batches, args.repeats
        )
    for size in image_sizes:
        runs = {
            f"torch -> {size}": lambda size=size: build_torch_loader(
                split, augment=True, num_workers=args.threads, image_size=size, **common
            ),
            f"dali-{args.device} -> {size}": lambda size=size: DaliLoader(
                split, augment=True, num_threads=args.threads, device=args.device, image_size=size, **common
            ),
        }
        if ceiling:
            runs[f"synthetic -> {size}"] = lambda size=size: SyntheticLoader(
                split, device="cuda" if args.device == "gpu" else "cpu", image_size=size, **common
            )
        for name, make in runs.items():
            results[name] = time_loader(make, args.warmup, args.batches, args.repeats)
            print(f"  {name:28s} {results[name]['images_per_s']:9.1f} images/s", flush=True)
    return results


def profile_stages(split, batch_size, image_size, device, batches=4):
    """Milliseconds per image of each stage, one CPU thread, for both real back-ends."""
    from galcf_hpc.loaders.augment import sample_angles, warp_batch

    out = {"dali": {}, "torch": {}}
    previous = 0.0
    for stage in ("read", "decode"):
        p = _dali_decode_pipeline(split, batch_size, 1, device, stage)
        p.run()
        t0 = time.perf_counter()
        for _ in range(batches):
            p.run()
        total = (time.perf_counter() - t0) * 1000 / (batches * batch_size)
        out["dali"][stage] = total - previous
        previous = total
        del p
    loader = DaliLoader(split, batch_size, image_size, augment=True, num_threads=1, device=device)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    out["dali"]["augment+batch"] = (time.perf_counter() - t0) * 1000 / (batches * batch_size) - previous
    loader.close()
    ds = ShardDataset(split)
    n = batches * batch_size
    t0 = time.perf_counter()
    raw = torch.from_numpy(np.stack([ds[i]["image"] for i in range(n)]))
    t1 = time.perf_counter()
    warp_batch(raw, image_size, 0.7, sample_angles(ds.keys[:n], 0, 0, 180.0))
    t2 = time.perf_counter()
    ds.close()
    out["torch"] = {"read+decode": (t1 - t0) * 1000 / n, "augment": (t2 - t1) * 1000 / n}
    return out


def _table(now, before, image_sizes, device):
    lines = ["| back-end | input -> model | images/s | of its decoder's ceiling | before | now / before |"]
    lines.append("|---|---|---|---|---|---|")
    ceilings = {"torch": now.get("decode only: torch (Pillow)"), f"dali-{device}": now.get("decode only: dali")}
    for size in image_sizes:
        for backend in ("torch", f"dali-{device}"):
            key = f"{backend} -> {size}"
            rate = now[key]["images_per_s"]
            of = f"{rate / ceilings[backend]['images_per_s']:.2f}" if ceilings[backend] else "-"
            old = before.get(key, {}).get("images_per_s") if before else None
            lines.append(
                f"| {backend} | {size} | {rate:.1f} | {of} | {f'{old:.1f}' if old else '-'} | "
                f"{f'{rate / old:.2f}x' if old else '-'} |"
            )
    for name in ("decode only: torch (Pillow)", "decode only: dali"):
        if name in now:
            lines.append(f"| {name} | - | {now[name]['images_per_s']:.1f} | 1.00 | - | - |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, help="existing shard directory (default: render one)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "galcf-bench-loader")
    ap.add_argument("--galaxies", type=int, default=600)
    ap.add_argument("--size", type=int, default=256, help="cutout size of rendered shards")
    ap.add_argument("--image-sizes", type=int, nargs="+", default=[256, 64, 32], help="model input sizes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="DALI and synthetic device")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="also measure the back-ends of this git revision")
    ap.add_argument("--package-from", type=Path, help=argparse.SUPPRESS)  # the --baseline child
    ap.add_argument("--profile", action="store_true", help="also time each stage on one thread")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_loader.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    shards = args.shards or make_shards(
        args.cache / f"{args.size}px-{args.galaxies}", args.galaxies, args.size, args.threads
    )
    split = shards / "train"
    if args.package_from:  # child: the baseline's back-ends only, as JSON
        args.out.write_text(json.dumps(measure(split, args.image_sizes, args, ceiling=False)) + "\n")
        return
    before = None
    if args.baseline:
        from baseline import worktree  # benchmarks/baseline.py

        with worktree(args.baseline) as tree, tempfile.TemporaryDirectory() as tmp:
            print(f"before ({args.baseline}):", flush=True)
            child = [a for a in argv if not a.startswith("--baseline") and a != args.baseline]
            child_out = Path(tmp) / "before.json"
            cmd = [sys.executable, __file__, *child, "--shards", str(shards), "--package-from", str(tree)]
            subprocess.run([*cmd, "--out", str(child_out)], check=True)
            before = json.loads(child_out.read_text())
    print("now:", flush=True)
    results = measure(split, args.image_sizes, args)
    table = _table(results, before, args.image_sizes, args.device)
    print("\n" + table)
    report = {
        "benchmark": "loader",
        "shards": str(shards),
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "results": results,
        "before": before,
        "table": table,
    }
    if args.profile:
        largest = max(args.image_sizes)
        report["profile_ms_per_image"] = profile = profile_stages(split, args.batch_size, largest, args.device)
        print(f"\nms per image and stage, one thread, -> {largest} px:")
        for backend, stages in profile.items():
            print(f"  {backend:6s} " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
