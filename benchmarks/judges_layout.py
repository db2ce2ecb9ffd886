"""Memory layout of the judges' training step: contiguous (NCHW) against channels-last (NHWC).

Every judge family of the panel trains a few steps on random images in each layout, the
layouts alternating within this one process (the same weights, batch and threads), under
the bf16 autocast the judges train in where the CPU computes bf16 natively (fp32 elsewhere,
or with --fp32). Prints one JSON line per family and input with the seconds per step of
each layout and their ratio (> 1: channels-last is faster), and the layout the family trains
in at that precision (``memory_format`` of its class in galcf_hpc/judges/nets.py).

    python benchmarks/judges_layout.py --size 32 --threads 2
"""

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from galcf_hpc.device import cpu_has_native_bf16
from galcf_hpc.judges.nets import build_judge
from galcf_hpc.judges.train import DEFAULT_PANEL, judge_channels

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def trainer(spec, size, batch, layout, bf16):
    """A function running one training step of a fresh judge of ``spec`` in ``layout``."""
    torch.manual_seed(0)
    model = build_judge(spec.family, judge_channels(size), spec.input).to(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, type(model).memory_format("bf16" if bf16 else "fp32")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="image size in pixels")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each timing both layouts")
    p.add_argument("--fp32", action="store_true", help="fp32 even where the CPU has native bf16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = cpu_has_native_bf16() and not args.fp32
    for spec in DEFAULT_PANEL:
        steps, used = {}, None
        for name, layout in LAYOUTS.items():
            steps[name], used = trainer(spec, args.size, args.batch, layout, bf16)
            for _ in range(3):  # warm-up: oneDNN picks its kernels
                steps[name]()
        seconds = {name: [] for name in LAYOUTS}
        for _ in range(args.rounds):
            for name in LAYOUTS:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[name]()
                seconds[name].append((time.perf_counter() - t0) / args.steps)
        med = {name: statistics.median(v) for name, v in seconds.items()}
        trains_in = next(name for name, layout in LAYOUTS.items() if layout == used)
        print(
            json.dumps(
                {
                    "judge": spec.name,
                    "family": spec.family,
                    "input": spec.input,
                    "size": args.size,
                    "batch": args.batch,
                    "threads": args.threads,
                    "precision": "bf16" if bf16 else "fp32",
                    "cpu": platform.processor() or platform.machine(),
                    "seconds_per_step": med,
                    "channels_last_speedup": med["contiguous"] / med["channels_last"],
                    "trains_in": trains_in,
                }
            )
        )


if __name__ == "__main__":
    main()
