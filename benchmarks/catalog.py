"""Catalog job throughput: galaxies/s per rank and the 1 -> N rank speed-up.

Runs ``mpiexec -n 1`` and ``mpiexec -n N`` of ``galcf-hpc catalog run`` on the same input
(a generated astroNN-format .h5 of Gaussian blobs) with a randomly initialised model of the
smoke configuration and, next to it, the default judge panel (three judges, randomly
initialised: the cost of a forward pass does not depend on the weights), then prints a
table. Work time is from each rank's first unit to the end of the work (startup and model
loading excluded); wall time is the whole command.

    python benchmarks/catalog.py [--galaxies 960] [--ranks 2] [--unit-size 32] [--no-judges] [--device cpu]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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


def run(root, ranks, unit_size, device):
    out = root / f"out-{ranks}"
    cmd = [
        "mpiexec",
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "galcf_hpc.cli",
        "catalog",
        "run",
        "--checkpoint",
        str(checkpoint(root)),
        "--input",
        str(root / "bench.h5"),
        "--out",
        str(out),
        "--unit-size",
        str(unit_size),
        "--device",
        device,
    ]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text()), wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--galaxies", type=int, default=960)
    p.add_argument("--size", type=int, default=64, help="input cutout side (pixels)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--unit-size", type=int, default=32)
    p.add_argument("--config", default=str(REPO / "configs" / "smoke.yaml"))
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="--device of the job")
    p.add_argument("--no-judges", action="store_true", help="no judge panel next to the model (model validity only)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_inputs(root, args.galaxies, args.size, args.config, judges=not args.no_judges)
        results = {n: run(root, n, args.unit_size, args.device) for n in (1, args.ranks)}
    first = results[1][0]
    print(
        f"catalog job, {args.galaxies} galaxies ({args.size} px in, smoke model, 10 targets, judges: "
        f"{', '.join(first['judges']) or 'none'}), units of {args.unit_size}, {first['device']}, "
        f"torch {torch.__version__}"
    )
    print(
        f"{'ranks':>5} {'rank':>4} {'units':>5} {'galaxies':>8} {'gal/s/rank':>10} | {'work s':>7} {'gal/s':>7} "
        f"{'wall s':>7}"
    )
    for n, (s, wall) in results.items():
        for r in s["per_rank"]:
            print(
                f"{n:5d} {r['rank']:4d} {r['units']:5d} {r['galaxies']:8d} {r['galaxies_per_s']:10.1f} | "
                f"{s['work_seconds']:7.1f} {s['num_galaxies'] / s['work_seconds']:7.1f} {wall:7.1f}"
            )
    (s1, w1), (sn, wn) = results[1], results[args.ranks]
    print(
        f"speed-up 1 -> {args.ranks} ranks: {s1['work_seconds'] / sn['work_seconds']:.2f}x (work time), "
        f"{w1 / wn:.2f}x (wall time incl. startup)"
    )


if __name__ == "__main__":
    main()
