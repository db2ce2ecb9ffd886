"""Training-step time on the CPU in fp32 and under ``train.cpu_bf16`` (bf16 autocast), in one
process, on the same model, batch and threads: the speed-up is a ratio against the fp32 run
next to it, never an absolute time.

    python3 benchmarks/cpu_bf16.py --config configs/synthetic64.yaml [--set key=value]
        [--part model|judges|explain] [--run RUN] [--batch 32] [--threads 1] [--steps 6]
        [--repeats 3] [--out F.json]

``--part judges`` times one step of every judge of the panel instead (``judges.batch_size``
unless ``--batch`` is given), as ``galcf-hpc judges train`` runs it beside the others, and
compares the first step's losses.

``--part explain`` times the model's inference pass as explain, report and catalog run it
(``explain_batch``: classify by ``model.classify_views`` views, decode, counterfactuals
towards every class, re-encode them; no judges) under ``inference_autocast`` against fp32,
and reports how many galaxies and counterfactuals the two precisions classify alike. With
``--run RUN`` the model is that run's trained one (its config) and the batch the first
galaxies of its ``explain.split``, which is what agreement means something for; otherwise a
freshly initialised model on random images.

One step is the whole objective of the config (``batch_losses``: reconstruction, MMD, IB,
critics, the counterfactual terms), its backward pass and the AdamW step. Both precisions
start from the same weights; the modes alternate (fp32, bf16, fp32, ...) ``--repeats`` times
so that a machine that slows down mid-run slows both; the first step of each block is a
warm-up. Reported: median seconds per step of each mode, their ratio, and how far the loss
terms of the first step under bf16 are from fp32 (relative), the numbers one would check
before trusting bf16 training.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import platform
import statistics
import tempfile
import time

import torch

from galcf_hpc.config import load_config
from galcf_hpc.data.classes import NUM_CLASSES
from galcf_hpc.device import cpu_has_native_bf16, inference_autocast, training_autocast
from galcf_hpc.explain.passes import valid_batches
from galcf_hpc.explain.run import load_run
from galcf_hpc.judges.train import DEFAULT_PANEL, _Trainee
from galcf_hpc.model.evaluation import explain_batch
from galcf_hpc.model.galcf import GalaxyCF
from galcf_hpc.train.objective import batch_losses


def _steps(model, images, labels, loss_cfg, autocast, steps):
    """Seconds of each of ``steps`` training steps after one warm-up, and the first step's terms."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seconds, first = [], None
    for i in range(steps + 1):
        started = time.perf_counter()
        with autocast:
            loss, terms = batch_losses(model, None, images, labels, loss_cfg, True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i == 0:
            first = {k: float(v) for k, v in terms.items()}
        else:
            seconds.append(time.perf_counter() - started)
    return seconds, first


def _judge_steps(cfg, images, labels, autocast, steps):
    """Seconds of each of ``steps`` steps of the whole panel (one step of every judge, as they
    train side by side) after one warm-up, and each judge's first loss."""
    with tempfile.TemporaryDirectory() as tmp:
        run = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=tmp))
        trainees = [_Trainee(run, spec, torch.device("cpu"), 1, steps + 1, None, autocast) for spec in DEFAULT_PANEL]
        seconds, first = [], None
        for i in range(steps + 1):
            for t in trainees:
                t.start_epoch()
            started = time.perf_counter()
            for t in trainees:
                t.step(images, labels)
            if i == 0:
                first = {t.spec.name: float(t.loss_sum) / t.seen for t in trainees}
            else:
                seconds.append(time.perf_counter() - started)
    return seconds, first


@torch.no_grad()
def _explain_passes(model, images, margin, autocast, steps):
    """Seconds of each of ``steps`` explain passes after one warm-up, and the first pass's
    classes of the galaxies and the model's verdicts on their counterfactuals."""
    seconds, first = [], None
    for i in range(steps + 1):
        started = time.perf_counter()
        with autocast:
            out = explain_batch(model, images, range(NUM_CLASSES), margin, metrics=())
        if i == 0:
            first = {"pred": out.pred.clone(), "valid": out.valid["model"].clone()}
        else:
            seconds.append(time.perf_counter() - started)
    return seconds, first


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="the configuration (not with --run)")
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument(
        "--part", choices=("model", "judges", "explain"), default="model", help="training step, panel, inference"
    )
    p.add_argument("--run", help="--part explain: a trained run directory whose model to time")
    p.add_argument("--batch", type=int, default=0, help="micro-batch of one rank (default 32; judges.batch_size)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=6, help="timed steps per block")
    p.add_argument("--repeats", type=int, default=3, help="blocks per mode, alternating")
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)
    if bool(args.config) == bool(args.run) or (args.run and args.part != "explain"):
        p.error("give --config, or --run with --part explain")

    if not cpu_has_native_bf16():
        raise SystemExit("this CPU has neither AMX-BF16 nor AVX512-BF16: train.cpu_bf16 would train in fp32")
    torch.set_num_threads(args.threads)
    if args.run:
        trained, cfg, _ = load_run(args.run, overrides=args.set)
    else:
        cfg = load_config(args.config, args.set)
    size = cfg.data.image_size
    batch = args.batch or (cfg.judges.batch_size if args.part == "judges" else 32)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, 10, (batch,), generator=gen)
    if args.run:  # galaxies of the run's own explain split: agreement on what the model is for
        images = torch.cat([x for _, x, _ in valid_batches(cfg, cfg.explain.split, batch)]).float()
    torch.manual_seed(cfg.run.seed)
    initial = None  # the judges build their own
    if args.part == "explain":
        initial = trained if args.run else GalaxyCF.from_config(cfg).eval()
    elif args.part == "model":
        initial = GalaxyCF.from_config(cfg)  # training steps: train mode
    bf16_train = dataclasses.replace(cfg.train, cpu_bf16=True)
    bf16 = (inference_autocast if args.part == "explain" else training_autocast)(torch.device("cpu"), bf16_train)
    modes = {"fp32": contextlib.nullcontext(), "bf16": bf16}
    seconds, terms = {m: [] for m in modes}, {}
    for _ in range(args.repeats):
        for mode, autocast in modes.items():
            torch.manual_seed(1)  # the same noise and targets in both modes' first step
            if args.part == "judges":
                got, first = _judge_steps(cfg, images, labels, autocast, args.steps)
            elif args.part == "explain":
                got, first = _explain_passes(initial, images, cfg.explain.margin, autocast, args.steps)
            else:
                got, first = _steps(copy.deepcopy(initial), images, labels, cfg.loss, autocast, args.steps)
            seconds[mode] += got
            terms.setdefault(mode, first)
    median = {m: statistics.median(v) for m, v in seconds.items()}
    if args.part == "explain":
        shown = terms["fp32"]["valid"] >= 0  # counterfactuals towards classes other than the galaxy's own
        agreement = {
            "same_class": float((terms["fp32"]["pred"] == terms["bf16"]["pred"]).float().mean()),
            "same_verdict": float((terms["fp32"]["valid"] == terms["bf16"]["valid"])[shown].float().mean()),
            "validity": {m: float(t["valid"][t["valid"] >= 0].float().mean()) for m, t in terms.items()},
        }
        terms = {m: {} for m in modes}
    rel = {k: abs(terms["bf16"][k] - v) / max(abs(v), 1e-8) for k, v in terms["fp32"].items() if k != "acc" and v == v}
    result = {
        "config": args.config,
        "overrides": args.set,
        "part": args.part,
        "image_size": size,
        "batch": batch,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "seconds_per_step": median,
        "speedup_bf16": median["fp32"] / median["bf16"],
        "max_rel_term_diff": max(rel.values(), default=None),
        "term_rel_diff": rel,
    }
    if args.part == "explain":
        result |= {"run": args.run, "views": cfg.model.classify_views, "agreement": agreement}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
