"""CPU weak scaling of training, 1 -> N ranks, for the DDP and DeepSpeed engines.

    python3 benchmarks/train_scaling.py [--ranks 2] [--engines ddp deepspeed] [--loader synthetic]

Each rank keeps the same micro-batch and one intra-op thread (weak scaling: work and
resources per rank fixed), so on an N-core machine the ideal N-rank run processes N times
the images per second of the 1-rank run. Ranks are started as local processes with the
torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), gloo on the CPU. The
model is the smoke configuration's; the synthetic loader (default) leaves data loading out,
``--loader torch`` includes it. Throughput is the median of the logged windows after the
first (warm-up); efficiency = X_N / (N X_1). Prints a table and writes JSON (``--out``).
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from galcf_hpc.config import dump_config, load_config  # noqa: E402


def make_shards(root, n=4000, size=64):
    from galcf_hpc.data.galaxy10 import write_catalog
    from galcf_hpc.data.shards import write_shards

    out = root / "shards"
    if not (out / "splits.json").is_file():
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:size, :size] - size / 2
        blob = np.exp(-(xx**2 + yy**2) / (2 * (size / 8) ** 2))
        images = (
            (rng.uniform(0.3, 1.0, (n, 1, 1, 3)) * 200 * blob[None, :, :, None] + rng.normal(8, 3, (n, size, size, 3)))
            .clip(0, 255)
            .astype(np.uint8)
        )
        write_catalog(root / "cat.h5", images, rng.integers(0, 10, n), rng.uniform(0, 360, n), rng.uniform(-60, 60, n))
        write_shards(root / "cat.h5", out, shard_size=300, fractions=(0.9, 0.05, 0.05))
    return out


def run(config_path, world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "galcf_hpc.cli", "train", "--config", str(config_path)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"training with {world} rank(s) failed:\n{err[-3000:]}")


def throughput(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in lines if r["kind"] == "train"][1:]
    return statistics.median(rates), min(rates), max(rates)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["ddp", "deepspeed"])
    ap.add_argument("--loader", default="synthetic", choices=["synthetic", "torch", "dali"])
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=35)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "galcf-bench-scaling")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_train_scaling.json"))
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override after the benchmark's own (e.g. train.log_every=1); repeatable",
    )
    args = ap.parse_args(argv)

    shards = make_shards(args.work / "data")  # 3600 training galaxies: no evaluation inside the timed steps
    results = []
    for engine in args.engines:
        rates = {}
        for world in sorted({1, args.ranks}):  # --ranks 1: the 1-rank run alone
            run_dir = args.work / f"{engine}-{world}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = load_config(
                ROOT / "configs" / "smoke.yaml",
                [
                    f"run.out_dir={run_dir}",
                    f"data.shards={shards}",
                    f"data.loader={args.loader}",
                    "data.device=cpu",
                    f"train.engine={engine}",
                    f"train.batch_size={args.micro_batch}",
                    "train.global_batch=0",
                    "train.threads=1",
                    f"train.stop_after_steps={args.steps}",
                    "train.log_every=5",
                    "train.epochs=100",
                    *args.set,
                ],
            )
            path = args.work / f"{engine}-{world}.yaml"
            path.write_text(dump_config(cfg))
            run(path, world)
            rates[world] = throughput(run_dir)
            print(
                f"{engine:10s} {world} rank(s): {rates[world][0]:8.1f} images/s "
                f"(windows {rates[world][1]:.1f}-{rates[world][2]:.1f})",
                flush=True,
            )
        eff = rates[args.ranks][0] / (args.ranks * rates[1][0])
        print(f"{engine:10s} weak-scaling efficiency 1 -> {args.ranks} ranks: {eff:.2f}", flush=True)
        results.append(
            {
                "engine": engine,
                "loader": args.loader,
                "micro_batch": args.micro_batch,
                "overrides": args.set,
                "images_per_s": {str(k): v[0] for k, v in rates.items()},
                "efficiency": eff,
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "train_weak_scaling",
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
