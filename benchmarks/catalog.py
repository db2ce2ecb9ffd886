"""Catalog job throughput: galaxies/s per rank, the 1 -> N rank speed-up, GPU-hours.

For each configuration (default: the smoke model at 32 px, the 64 px model, the paper's
256 px model) it runs ``mpiexec -n 1`` and ``mpiexec -n N`` of ``galcf-hpc catalog run`` on
the same input (a generated astroNN-format .h5 of Gaussian blobs at the model's input size)
with a randomly initialised model and, next to it, the default judge panel (three judges,
randomly initialised: the cost of a forward pass does not depend on the weights; every
counterfactual is judged by all three), then prints a table. Work time is from each rank's
first unit to the end of the work (startup and model loading excluded); wall time is the
whole command. Each rank is bound to one core (``mpiexec -bind-to core``), so it runs one
torch thread: galaxies/s per rank are per core on a CPU. The last column is the hours one
rank (one GPU with ``--device cuda``) needs for Galaxy Zoo DESI's 8.67 million galaxies at
that rate.

``--baseline REV`` runs the same inputs through the catalog job of an earlier commit too (a
git worktree of REV, its own ``galcf_hpc``), in the same run: before and after side by side.

    python benchmarks/catalog.py [--configs smoke synthetic64 galaxy10_decals] [--galaxies 256 128 32]
        [--ranks 2] [--images none full] [--baseline REV] [--device cpu|cuda] [--out F.json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from baseline import worktree  # benchmarks/baseline.py (the script's own directory)

from galcf_hpc.config import load_config
from galcf_hpc.data.classes import NUM_CLASSES
from galcf_hpc.data.galaxy10 import write_catalog
from galcf_hpc.judges import DEFAULT_PANEL, build_judge
from galcf_hpc.judges.nets import save_judge
from galcf_hpc.judges.train import judge_channels
from galcf_hpc.model.galcf import GalaxyCF

REPO = Path(__file__).resolve().parent.parent


def make_inputs(root, n, size, config, judges=True):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    sigma = rng.uniform(size / 12, size / 5, (n, 1, 1))
    blob = np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * sigma**2))
    images = np.clip(
        blob[..., None] * rng.uniform(120, 230, (n, 1, 1, 3)) + rng.normal(10, 5, (n, size, size, 3)), 0, 255
    ).astype(np.uint8)
    write_catalog(root / "bench.h5", images, rng.integers(0, 10, n), rng.uniform(0, 360, n), rng.uniform(-30, 60, n))
    cfg = load_config(config)
    torch.manual_seed(0)
    # RUN/checkpoints/model.pt: the catalog job looks for judges in RUN/judges
    (root / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"model": GalaxyCF.from_config(cfg).state_dict(), "config": cfg.to_dict()}, checkpoint(root))
    for spec in DEFAULT_PANEL if judges else ():
        channels = judge_channels(cfg.data.image_size)  # what `galcf-hpc judges train` builds
        (root / "run" / "judges" / spec.name).mkdir(parents=True)
        save_judge(
            root / "run" / "judges" / spec.name / "model.pt",
            build_judge(spec.family, channels, spec.input),
            {"family": spec.family, "channels": channels, "input": spec.input, "num_classes": NUM_CLASSES},
            {"name": spec.name},
        )


def checkpoint(root):
    return root / "run" / "checkpoints" / "model.pt"


def run(root, ranks, unit_size, device, images=None, tree=None):
    """One ``catalog run`` through mpiexec; ``tree``: another checkout's galcf_hpc."""
    out = root / f"out-{ranks}-{images or 'baseline'}-{'base' if tree else 'now'}"
    # one core per rank (MPICH's hydra): the job then runs one torch thread per rank, so a
    # rank's galaxies/s mean the same in the 1-rank and the N-rank run
    cmd = ["mpiexec", "-bind-to", "core", "-n", str(ranks), sys.executable, "-m", "galcf_hpc.cli", "catalog", "run"]
    cmd += ["--checkpoint", str(checkpoint(root)), "--input", str(root / "bench.h5"), "--out", str(out)]
    cmd += ["--unit-size", str(unit_size), "--device", device]
    if images:
        cmd += ["--images", images]
    env = dict(os.environ, PYTHONPATH=str(tree)) if tree else None
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    wall = time.monotonic() - t0
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out)
    return summary, wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["smoke", "synthetic64", "galaxy10_decals"])
    p.add_argument("--galaxies", nargs="+", type=int, default=[256, 128, 32], help="per config")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--unit-size", type=int, default=32)
    p.add_argument("--images", nargs="+", default=["none", "full"], choices=("none", "thumbnails", "full"))
    p.add_argument("--baseline", default=None, help="also run the catalog job of this git revision")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="--device of the job")
    p.add_argument("--no-judges", action="store_true", help="no judge panel next to the model (model validity only)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args()
    counts = dict(zip(args.configs, args.galaxies + args.galaxies[-1:] * len(args.configs)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, worktree(args.baseline) as base:
        for name in args.configs:
            config = REPO / "configs" / f"{name}.yaml"
            size = load_config(config).data.image_size
            root = Path(tmp) / name
            root.mkdir()
            make_inputs(root, counts[name], size, config, judges=not args.no_judges)
            variants = ([("before", None, base)] if base else []) + [(f"images {i}", i, None) for i in args.images]
            for label, images, tree in variants:
                res = {n: run(root, n, args.unit_size, args.device, images, tree) for n in (1, args.ranks)}
                (s1, w1), (sn, wn) = res[1], res[args.ranks]
                per_rank = s1["per_rank"][0]["galaxies_per_s"]
                rows.append(
                    {
                        "config": name,
                        "image_size": size,
                        "code": label,
                        "galaxies": counts[name],
                        "device": s1["device"],
                        "galaxies_per_s_per_rank": per_rank,
                        f"speedup_1_to_{args.ranks}": s1["work_seconds"] / sn["work_seconds"],
                        "gpu_hours_8.67M": DESI / per_rank / 3600,
                        "wall_s": {"1": w1, str(args.ranks): wn},
                    }
                )
                print(_line(rows[-1], args.ranks), flush=True)
    print(
        f"\ncatalog job, judges: {'none' if args.no_judges else 'default panel'}, units of {args.unit_size}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"{'config':16s} {'px':>4} {'code':14s} {'gal/s/rank':>10} {'1->' + str(args.ranks):>6} {'h/8.67M':>9}")
    for r in rows:
        print(_line(r, args.ranks))
    for name in args.configs:
        mine = {r["code"]: r for r in rows if r["config"] == name}
        if "before" in mine:
            for label, r in mine.items():
                if label != "before":
                    ratio = r["galaxies_per_s_per_rank"] / mine["before"]["galaxies_per_s_per_rank"]
                    print(f"{name}: {label} / before = {ratio:.2f}x galaxies/s per rank")
    if args.out:
        args.out.write_text(json.dumps({"baseline": args.baseline, "rows": rows}, indent=2) + "\n")


DESI = 8_670_000  # Galaxy Zoo DESI


def _line(r, ranks):
    return (
        f"{r['config']:16s} {r['image_size']:4d} {r['code']:14s} {r['galaxies_per_s_per_rank']:10.2f} "
        f"{r[f'speedup_1_to_{ranks}']:6.2f} {r['gpu_hours_8.67M']:9.0f}"
    )


if __name__ == "__main__":
    main()
