"""GPU checks in one call: every GPU measurement the project owes, on ONE GPU, in under 8 minutes.

    bash scripts/gpu_check.sh [--out gpu_check_out] [--only dali_decode,catalog] [--dry-run]
    python3 benchmarks/gpu_check.py ...            (the same; the script is a thin wrapper)

Setup renders ``--galaxies`` Galaxy10-like galaxies at ``--size`` px with GalSim (``galcf-hpc
data synth``; the analytic renderer if GalSim is missing) into a temporary directory and
shards them (``galcf-hpc data shard``) in every image format of png / jpeg / jp2 that the
installed ``data shard --help`` offers. The model is the paper's architecture at 256 px
(``configs/galaxy10_decals.yaml``) with a fixed-seed RANDOM VGG16 in the perceptual loss
(``model.vgg_weights: null, model.vgg_random: true``: no ImageNet weights can be downloaded on
a compute node; ``--vgg-weights FILE`` uses real ones). The checks (``CHECKS`` below, listed
with ``--dry-run``) each run in their own process under their own time budget; a missing
dependency (DALI, DeepSpeed, FrEIA) skips a check with the reason recorded, and a check that
fails or runs out of time does not stop the others.

Writes ``OUT/gpu_check.json`` (every number, versions of torch / CUDA / cuDNN / NCCL / DALI /
DeepSpeed, the GPU's name and driver), ``OUT/gpu_check.md`` (the same as Markdown tables) and
``OUT/gpu_check.log`` (the checks' own output). Exit codes: 0 every check ran or was skipped
with a reason, 1 a check failed or ran out of time, 2 no GPU (or a usage error).
docs/gpu_check.md describes the fields and how to install the dependencies offline.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "galcf-hpc gpu_check 1"
EXIT_FAILED, EXIT_NO_GPU = 1, 2
FORMATS = ("png", "jpeg", "jp2")  # canonical names; `data shard` may spell jpeg "jpg"
_FORMAT_ALIASES = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "jp2": "jp2", "j2k": "jp2", "jpeg2000": "jp2"}
STATUSES = ("ok", "skipped", "failed", "timeout")


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    measures: str
    budget_s: int


SETUP = Check(
    "setup",
    "render the galaxies with GalSim (data synth) and shard them in each image format that data shard offers",
    80,
)
CHECKS = (
    Check(
        "dali_decode",
        "DALI 'mixed' (GPU) vs CPU decoding, per shard format png/jpeg/jp2: max |difference| of the decoded, "
        "cropped and resized batches (no rotation), and images/s of each device",
        70,
    ),
    Check(
        "train_throughput",
        "training images/s at 256 px, bf16, DDP engine on one rank (NCCL, world size 1), fed by DALI-GPU, "
        "the torch back-end and synthetic batches (warm-up + timed steps each)",
        150,
    ),
    Check(
        "bf16_vs_fp32",
        "one training step's loss (and gradient) in bf16 autocast against fp32 (TF32 off): same weights, "
        "same batch, same seeds; relative difference",
        40,
    ),
    Check(
        "deepspeed_zero1",
        "DeepSpeed ZeRO stage 1, one rank: a training step's loss is finite and the engine's bf16 "
        "torch_autocast is active (dtype seen inside the model), then images/s of a few steps",
        70,
    ),
    Check(
        "catalog",
        "catalog job (galcf-hpc catalog run, 1 rank, --images none): galaxies/s at 256 px with 9 "
        "counterfactual targets per galaxy and the default judge panel",
        60,
    ),
)
TOTAL_BUDGET_S = 480  # 8 minutes: setup + checks


class Skip(Exception):
    """A check cannot run here (a dependency is missing); the message says why."""


# ----------------------------------------------------------------------------- pure helpers


def plan_text(checks=CHECKS, setup=SETUP, total=TOTAL_BUDGET_S):
    """What a run would do: one line per step with its budget (``--dry-run``)."""
    lines = [f"gpu_check: {len(checks)} checks on one GPU, total budget {total} s", ""]
    for c in (setup, *checks):
        lines.append(f"  {c.name:18s} budget {c.budget_s:4d} s  {c.measures}")
    spent = setup.budget_s + sum(c.budget_s for c in checks)
    lines += ["", f"sum of budgets: {spent} s (each check runs in its own process, killed at its budget)"]
    return "\n".join(lines)


def shard_formats(help_text):
    """(option, {canonical format: the value data shard takes}) from ``data shard --help``.

    Reads ``--image-format {png,jpeg,jp2}`` (or the older ``--format {png,jpg}``); formats
    outside png/jpeg/jp2 are ignored. (None, {}) when the help names neither option."""
    found = re.search(r"(--image-format|--format)[ =]\{([^}]*)\}", help_text)
    if not found:
        return None, {}
    offered = {}
    for value in (v.strip() for v in found.group(2).split(",")):
        canonical = _FORMAT_ALIASES.get(value.lower())
        if canonical and canonical not in offered:
            offered[canonical] = value
    return found.group(1), offered


def relative_difference(value, reference):
    """|value - reference| / |reference| (inf when the reference is 0 and the value is not)."""
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return abs(value - reference) / abs(reference)


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e6:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def headline(name, check):
    """One line of what a check found, for the summary table."""
    r = check.get("results") or {}
    if check.get("status") in ("skipped", "failed", "timeout") and not r:
        return check.get("reason") or ""
    if name == "setup":
        formats = ", ".join(r.get("formats", {})) or "none"
        where = f"{r.get('galaxies', '?')} galaxies at {r.get('size', '?')} px ({r.get('renderer', '?')})"
        return f"{where}; formats: {formats}"
    if name == "dali_decode":
        parts = []
        for fmt, f in r.get("formats", {}).items():
            rate = f.get("images_per_s", {})
            parts.append(
                f"{fmt}: max diff {_fmt(f.get('max_abs_diff'))}, "
                f"{_fmt(rate.get('cpu'))} / {_fmt(rate.get('gpu'))} images/s CPU / GPU"
            )
        return "; ".join(parts)
    if name == "train_throughput":
        parts = [
            f"{label}: skipped" if run.get("skipped") else f"{label}: {_fmt(run.get('images_per_s'))} images/s"
            for label, run in r.get("runs", {}).items()
        ]
        return "; ".join(parts)
    if name == "bf16_vs_fp32":
        return (
            f"loss fp32 {_fmt(r.get('loss_fp32'), 5)}, bf16 {_fmt(r.get('loss_bf16'), 5)}: relative difference "
            f"{_fmt(r.get('rel_diff_loss'))}; gradient {_fmt(r.get('grad_rel_diff'))} "
            f"(cosine {_fmt(r.get('grad_cosine'), 4)})"
        )
    if name == "deepspeed_zero1":
        return (
            f"loss {_fmt(r.get('loss'), 5)} (finite: {_fmt(r.get('loss_finite'))}), autocast active: "
            f"{_fmt(r.get('autocast_active'))} ({r.get('autocast_dtype_seen', '-')}), "
            f"{_fmt(r.get('images_per_s'))} images/s"
        )
    if name == "catalog":
        return (
            f"{_fmt(r.get('galaxies_per_s'))} galaxies/s ({r.get('galaxies', '?')} galaxies, "
            f"{r.get('targets_per_galaxy', '?')} targets each, {r.get('image_size', '?')} px)"
        )
    return ""


def markdown_report(results):
    """The results dict as Markdown: header, summary table, detail tables (pure function)."""
    gpu = results.get("gpu") or {}
    v = results.get("versions") or {}
    out = [
        "# galcf-hpc GPU check",
        "",
        f"- GPU: {gpu.get('name', '-')} ({_fmt(gpu.get('memory_gib'))} GiB, driver {gpu.get('driver', '-')}, "
        f"compute capability {gpu.get('capability', '-')})",
        f"- versions: torch {v.get('torch', '-')}, CUDA {v.get('cuda', '-')}, cuDNN {v.get('cudnn', '-')}, "
        f"NCCL {v.get('nccl', '-')}, DALI {v.get('dali', '-')}, DeepSpeed {v.get('deepspeed', '-')}, "
        f"galcf-hpc {v.get('galcf_hpc', '-')}, Python {v.get('python', '-')}",
        f"- started {results.get('started', '-')} on {results.get('host', '-')}; wall {_fmt(results.get('wall_s'))} s "
        f"of a {results.get('total_budget_s', '-')} s budget",
    ]
    cfg = results.get("config") or {}
    if cfg:
        out.append(
            f"- model: {cfg.get('path', '-')} at {cfg.get('image_size', '-')} px; "
            f"perceptual VGG16: {cfg.get('vgg', '-')}"
        )
    out += ["", "| check | status | result | seconds / budget |", "|---|---|---|---|"]
    rows = [("setup", results.get("setup") or {})] + list((results.get("checks") or {}).items())
    for name, check in rows:
        status = check.get("status", "-")
        text = headline(name, check)
        if status != "ok" and check.get("reason") and check.get("results"):
            text = f"{text} ({check['reason']})"
        out.append(
            f"| {name} | {status} | {text.replace('|', '/')} | "
            f"{_fmt(check.get('seconds'))} / {check.get('budget_s', '-')} |"
        )
    checks = results.get("checks") or {}
    decode = (checks.get("dali_decode") or {}).get("results") or {}
    if decode.get("formats") or decode.get("skipped_formats"):
        out += [
            "",
            "## DALI decoding: GPU ('mixed') vs CPU, no rotation",
            "",
            "| format | images | max abs diff | mean abs diff | GPU vs torch back-end, max "
            "| images/s CPU | images/s GPU | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for fmt, f in decode.get("formats", {}).items():
            rate = f.get("images_per_s", {})
            out.append(
                f"| {fmt} | {_fmt(f.get('images'))} | {_fmt(f.get('max_abs_diff'))} | {_fmt(f.get('mean_abs_diff'))} | "
                f"{_fmt(f.get('max_abs_diff_torch'))} | {_fmt(rate.get('cpu'))} | {_fmt(rate.get('gpu'))} | "
                f"{f.get('note') or ''} |"
            )
        for fmt, why in decode.get("skipped_formats", {}).items():
            out.append(f"| {fmt} | - | - | - | - | - | - | skipped: {why} |")
    train = (checks.get("train_throughput") or {}).get("results") or {}
    if train.get("runs"):
        out += [
            "",
            f"## Training throughput ({train.get('image_size', '?')} px, micro-batch {train.get('micro_batch', '?')}, "
            f"bf16 {_fmt(train.get('bf16'))}, {train.get('backend', '?')} world size {train.get('world_size', '?')}, "
            f"{train.get('warmup', '?')} warm-up + {train.get('steps', '?')} timed steps)",
            "",
            "| fed by | images/s | of synthetic | step ms | data wait ms | compute ms | peak memory GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, run in train["runs"].items():
            if run.get("skipped"):
                out.append(f"| {label} | - | - | - | - | - | skipped: {run['skipped']} |")
                continue
            ms = {k: None if run.get(k) is None else 1000 * run[k] for k in ("step_s", "data_s", "compute_s")}
            mem = run.get("peak_memory_bytes")
            out.append(
                f"| {label} | {_fmt(run.get('images_per_s'))} | {_fmt(run.get('ratio_to_synthetic'))} | "
                f"{_fmt(ms['step_s'])} | {_fmt(ms['data_s'])} | {_fmt(ms['compute_s'])} | "
                f"{_fmt(None if mem is None else mem / 2**30)} |"
            )
    bf16 = (checks.get("bf16_vs_fp32") or {}).get("results") or {}
    if bf16.get("terms"):
        out += [
            "",
            "## bf16 vs fp32, one step",
            "",
            "| term | fp32 | bf16 | relative difference |",
            "|---|---|---|---|",
        ]
        for term, t in bf16["terms"].items():
            out.append(f"| {term} | {_fmt(t.get('fp32'), 5)} | {_fmt(t.get('bf16'), 5)} | {_fmt(t.get('rel_diff'))} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- children: one per check


def _galcf(*args):
    """``galcf-hpc ...`` of this checkout (not whatever is first on PATH)."""
    return [sys.executable, "-m", "galcf_hpc.cli", *args]


def _child_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(cmd, timeout=None):
    print("$ " + " ".join(map(str, cmd)), flush=True)
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=_child_env(), cwd=ROOT, timeout=timeout
    )
    sys.stdout.write(done.stdout[-4000:])
    sys.stdout.write(done.stderr[-4000:])
    sys.stdout.flush()
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"exit {done.returncode}: {tail[0][:300]}")
    return done.stdout


def _require(module, hint):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{module} is not installed ({hint}): {exc}") from None


def _require_model():
    _require("FrEIA", "pip install FrEIA; offline: scripts/gpu_wheels.sh")


def _require_dali():
    _require("nvidia.dali", "pip install nvidia-dali-cuda130; offline: scripts/gpu_wheels.sh, group dali")


def _setup_results(ctx):
    path = Path(ctx["work"]) / "result-setup.json"
    if not path.is_file():
        raise Skip("setup wrote no shards")
    setup = json.loads(path.read_text())
    shards = {fmt: Path(f["shards"]) for fmt, f in (setup.get("results") or {}).get("formats", {}).items()}
    if not shards:
        raise Skip(f"setup made no shards ({setup.get('reason') or 'no format offered'})")
    return shards


def _config(ctx, *overrides):
    from galcf_hpc.config import load_config

    return load_config(ctx["config"], list(overrides))


def _device(ctx):
    import torch

    return torch.device("cuda", 0) if ctx["device"] == "cuda" else torch.device("cpu")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_setup(ctx, res, save):
    work = Path(ctx["work"])
    res.update(galaxies=ctx["galaxies"], size=ctx["size"], formats={}, skipped_formats={})
    option, offered = shard_formats(_run(_galcf("data", "shard", "--help")))
    res["shard_option"] = option
    for fmt in FORMATS:
        if fmt not in offered:
            res["skipped_formats"][fmt] = (
                f"not offered by `galcf-hpc data shard --help` ({option or 'no format option'})"
            )
    try:
        import galsim  # noqa: F401

        res["renderer"] = "galsim"
        synth = ["--workers", str(min(16, os.cpu_count() or 1))]
    except ImportError:
        res["renderer"] = "analytic"
        res["renderer_note"] = "GalSim not installed: the package's analytic numpy renderer drew the galaxies"
        synth = ["--renderer", "analytic"]
    catalog = work / "catalog.h5"
    t0 = time.perf_counter()
    _run(_galcf("data", "synth", "--out", catalog, "--n", ctx["galaxies"], "--size", ctx["size"], "--seed", 0, *synth))
    res["synth_s"] = time.perf_counter() - t0
    save()
    for fmt, value in offered.items():
        out = work / f"shards-{fmt}"
        t0 = time.perf_counter()
        try:
            _run(_galcf("data", "shard", "--input", catalog, "--out", out, "--shard-size", 200, option, value))
        except RuntimeError as exc:
            res["skipped_formats"][fmt] = f"data shard failed: {exc}"
            continue
        res["formats"][fmt] = {"shards": str(out), "option_value": value, "seconds": time.perf_counter() - t0}
        save()
    if not res["formats"]:
        raise RuntimeError("no shard format could be written")


def _images_by_key(loader):
    """{key: image (CPU float32 CHW)} of one pass over an evaluation loader (padding dropped)."""
    images = {}
    for batch in loader:
        valid = batch.get("valid")
        x = batch["images"].float().cpu()
        for i, key in enumerate(batch["keys"]):
            if valid is None or bool(valid[i]):
                images[key] = x[i]
    return images


def _rate(loader, device):
    """images/s of one more pass over an evaluation loader (padding not counted)."""
    n = 0
    t0 = time.perf_counter()
    for batch in loader:
        n += int(batch["valid"].sum()) if "valid" in batch else batch["images"].shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def check_dali_decode(ctx, res, save):
    import torch

    _require_dali()
    from galcf_hpc.loaders.dali import DaliLoader
    from galcf_hpc.loaders.torch import build_torch_loader

    shards = _setup_results(ctx)
    setup = json.loads((Path(ctx["work"]) / "result-setup.json").read_text())["results"]
    gpu = "gpu" if ctx["device"] == "cuda" else "cpu"
    threads, batch = ctx["threads"], ctx["batch_size"]
    res.update(
        formats={},
        skipped_formats=dict(setup.get("skipped_formats", {})),
        threads=threads,
        batch_size=batch,
        image_size=ctx["image_size"],
        pipeline="evaluation stream: decode, central crop 0.7, antialiased resize, CHW float (no rotation)",
    )
    for fmt, root in shards.items():
        split = root / "train"
        entry = {}
        res["formats"][fmt] = entry
        try:
            got, rates = {}, {}
            for name, device in (("cpu", "cpu"), ("gpu", gpu)):
                loader = DaliLoader(
                    split,
                    batch_size=batch,
                    image_size=ctx["image_size"],
                    train=False,
                    augment=False,
                    num_threads=threads,
                    device=device,
                    device_id=0 if device == "gpu" else None,
                )
                got[name] = _images_by_key(loader)  # first pass: warm-up and the images
                rates[name] = _rate(loader, _device(ctx) if device == "gpu" else torch.device("cpu"))
                loader.close()
            ref = build_torch_loader(
                split, batch_size=batch, image_size=ctx["image_size"], train=False, augment=False, num_workers=0
            )
            torch_images = _images_by_key(ref)
            ref.close()
            keys = sorted(got["cpu"])
            if sorted(got["gpu"]) != keys:
                raise RuntimeError("the GPU and CPU pipelines returned different samples")
            diff = torch.stack([(got["gpu"][k] - got["cpu"][k]).abs().amax() for k in keys])
            mean = torch.stack([(got["gpu"][k] - got["cpu"][k]).abs().mean() for k in keys])
            vs_torch = [(got["gpu"][k] - torch_images[k]).abs().amax() for k in keys if k in torch_images]
            entry.update(
                images=len(keys),
                max_abs_diff=float(diff.max()),
                max_abs_diff_255=float(diff.max()) * 255,
                mean_abs_diff=float(mean.mean()),
                max_abs_diff_torch=float(torch.stack(vs_torch).max()) if vs_torch else None,
                images_per_s=rates,
            )
            if fmt == "png":
                entry["note"] = "PNG: 'mixed' decodes on the CPU (nvImageCodec); resize and layout on the GPU"
        except Exception as exc:  # one format failing does not stop the others
            traceback.print_exc()
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            entry["note"] = f"failed: {entry['error']}"
        save()
    if all("error" in f for f in res["formats"].values()):
        raise RuntimeError("every format failed: " + "; ".join(f"{k}: {f['error']}" for k, f in res["formats"].items()))


def _init_group(ctx):
    """This process as rank 0 of a world of 1 (NCCL on the GPU, gloo on the CPU)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    from galcf_hpc.train import distributed

    env = distributed.detect(ctx["device"])
    distributed.init_process_group(env, 5.0, always=True)
    return env, distributed


def check_train_throughput(ctx, res, save):
    import gc

    import torch
    from torch import nn

    _require_model()
    from galcf_hpc.scaling.harness import configure, peak_memory_bytes, time_steps
    from galcf_hpc.train.build import build_rank

    shards = _setup_results(ctx)
    try:
        _require_dali()
        dali = None
    except Skip as exc:
        dali = str(exc)
    env, distributed = _init_group(ctx)
    cfg = _config(ctx)
    res.update(
        image_size=cfg.data.image_size,
        micro_batch=cfg.train.batch_size,
        bf16=bool(cfg.train.bf16 and env.device.type == "cuda"),
        backend=env.backend,
        world_size=env.world_size,
        warmup=ctx["warmup"],
        steps=ctx["steps"],
        ddp_wrapper=True,
        loader_workers=cfg.data.num_workers,
        runs={},
    )
    gpu = "gpu" if ctx["device"] == "cuda" else "cpu"
    runs = [("synthetic", "synthetic", "png")]
    runs += [(f"DALI-{gpu} ({fmt})", "dali", fmt) for fmt in ("png", "jpeg") if fmt in shards]
    runs += [("torch (png)", "torch", "png")]
    try:
        for label, loader, fmt in runs:
            if loader == "dali" and dali:
                res["runs"][label] = {"skipped": dali}
                continue
            root = shards.get(fmt) or next(iter(shards.values()))
            c = configure(cfg, "weak", "ddp", loader)
            c = dataclasses.replace(c, data=dataclasses.replace(c.data, shards=str(root), device=gpu))
            if env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(env.device)
            built = build_rank(c, env)
            engine = built.engine
            # one rank skips the DDP wrapper in training; wrap here so that the step is the one
            # each GPU of a multi-GPU job runs (buckets, NCCL all-reduce of the gradients)
            engine.module = nn.parallel.DistributedDataParallel(
                engine.objective, device_ids=[env.device.index] if env.device.type == "cuda" else None
            )
            try:
                blocks, _ = time_steps(built, ctx["steps"], ctx["warmup"], 1)
            finally:
                built.loader.close()
            b = blocks[0]
            res["runs"][label] = {
                "loader": loader,
                "format": None if loader == "synthetic" else fmt,
                "images_per_s": ctx["steps"] * built.micro / b["wall_s"],
                "step_s": b["wall_s"] / ctx["steps"],
                "data_s": b["data_s"],
                "compute_s": b["compute_s"],
                "compute_median_s": statistics.median(b["compute_steps"]),
                "peak_memory_bytes": peak_memory_bytes(env.device),
            }
            del built, engine
            gc.collect()
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
            base = res["runs"].get("synthetic", {}).get("images_per_s")
            for run in res["runs"].values():
                if base and run.get("images_per_s"):
                    run["ratio_to_synthetic"] = run["images_per_s"] / base
            save()
    finally:
        distributed.shutdown()


def check_bf16_vs_fp32(ctx, res, save):
    import torch

    _require_model()
    from galcf_hpc.model.galcf import GalaxyCF
    from galcf_hpc.train import distributed
    from galcf_hpc.train.build import build_perceptual
    from galcf_hpc.train.engines import DDPEngine, Objective

    cfg = _config(ctx)
    device = _device(ctx)
    env = distributed.detect(ctx["device"])
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(cfg.run.seed)
    model = GalaxyCF.from_config(cfg).to(device).train()
    objective = Objective(model, build_perceptual(cfg.model, cfg.loss, cfg.run.seed, device), cfg.loss)
    batch_size = cfg.train.batch_size
    try:
        from galcf_hpc.loaders.torch import build_torch_loader

        split = _setup_results(ctx).get("png", next(iter(_setup_results(ctx).values()))) / "train"
        loader = build_torch_loader(
            split, batch_size=batch_size, image_size=cfg.data.image_size, train=False, augment=False, num_workers=0
        )
        first = next(iter(loader))
        loader.close()
        images, labels, source = first["images"], first["labels"], f"first evaluation batch of {split}"
    except Skip:
        g = torch.Generator().manual_seed(0)
        images = torch.rand(batch_size, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
        labels = torch.randint(0, 10, (batch_size,), generator=g)
        source = "uniform random images (no shards)"
    images, labels = images.to(device), labels.to(device)

    def step(bf16):
        train_cfg = dataclasses.replace(cfg.train, bf16=bf16)
        autocast = DDPEngine(train_cfg, objective, env, lambda s: 1.0).autocast  # the engine's own context
        objective.zero_grad(set_to_none=True)
        torch.manual_seed(1234)
        with autocast:
            loss, terms = objective(images, labels, True)
        loss.backward()
        # float64: a float32 dot product over ~2e7 elements is off by more than the effect measured
        grads = torch.cat([p.grad.detach().double().flatten() for p in model.parameters() if p.grad is not None])
        _sync(device)
        return float(loss), {k: float(v) for k, v in terms.items()}, grads

    loss32, terms32, g32 = step(False)
    loss16, terms16, g16 = step(True)
    res.update(
        batch=source,
        batch_size=batch_size,
        image_size=cfg.data.image_size,
        tf32=False,
        autocast_dtype="bfloat16" if device.type == "cuda" else None,
        loss_fp32=loss32,
        loss_bf16=loss16,
        rel_diff_loss=relative_difference(loss16, loss32),
        terms={
            k: {
                "fp32": terms32[k],
                "bf16": terms16.get(k),
                "rel_diff": relative_difference(terms16.get(k, math.nan), terms32[k]),
            }
            for k in terms32
        },
        grad_rel_diff=float((g16 - g32).norm() / g32.norm().clamp_min(1e-30)),
        grad_cosine=float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)),
        grad_elements=int(g32.numel()),
    )
    if device.type != "cuda":
        res["note"] = "CPU: the engines ignore train.bf16 off the GPU, so both steps ran in fp32"


def check_deepspeed_zero1(ctx, res, save):
    import torch

    _require_model()
    deepspeed = _require("deepspeed", "DS_BUILD_OPS=0 pip install deepspeed; offline: scripts/gpu_wheels.sh")
    from galcf_hpc.scaling.harness import configure, endless
    from galcf_hpc.train.build import build_rank

    shards = _setup_results(ctx)
    env, distributed = _init_group(ctx)
    try:
        cfg = configure(_config(ctx, "train.zero_stage=1"), "weak", "deepspeed", "synthetic")
        gpu = "gpu" if ctx["device"] == "cuda" else "cpu"
        root = shards.get("png") or next(iter(shards.values()))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=str(root), device=gpu))
        built = build_rank(cfg, env)
        ds = built.engine.engine
        seen = []
        conv = next(m for m in built.model.modules() if isinstance(m, torch.nn.Conv2d))

        def hook(module, inputs, output):
            seen.append((torch.is_autocast_enabled(env.device.type), str(output.dtype)))

        handle = conv.register_forward_hook(hook)
        batches = endless(built.loader)
        first = next(batches)
        terms = built.engine.micro_step(first["images"].to(env.device), first["labels"].to(env.device), True, True)
        loss = float(terms["loss"])
        handle.remove()
        expect = env.device.type == "cuda" and cfg.train.bf16
        enabled = getattr(ds, "torch_autocast_enabled", None)
        res.update(
            deepspeed=deepspeed.__version__,
            zero_stage=int(ds.zero_optimization_stage()),
            micro_batch=built.micro,
            loss=loss,
            loss_finite=math.isfinite(loss),
            autocast_configured=bool(enabled()) if callable(enabled) else None,
            autocast_active=bool(seen and seen[0][0]),
            autocast_dtype_seen=seen[0][1] if seen else None,
            autocast_expected=bool(expect),
        )
        save()
        for _ in range(2):  # warm-up
            b = next(batches)
            built.engine.micro_step(b["images"].to(env.device), b["labels"].to(env.device), True, True)
        _sync(env.device)
        steps = 5
        t0 = time.perf_counter()
        for _ in range(steps):
            b = next(batches)
            built.engine.micro_step(b["images"].to(env.device), b["labels"].to(env.device), True, True)
        _sync(env.device)
        res["images_per_s"] = steps * built.micro / (time.perf_counter() - t0)
        res["timed_steps"] = steps
        built.loader.close()
        problems = []
        if not res["loss_finite"]:
            problems.append(f"loss {loss} is not finite")
        if expect and not (res["autocast_active"] and res["autocast_dtype_seen"] == "torch.bfloat16"):
            problems.append(f"bf16 autocast not active inside the engine (saw {seen[:1]})")
        if res["zero_stage"] != 1:
            problems.append(f"ZeRO stage {res['zero_stage']}, expected 1")
        if problems:
            raise RuntimeError("; ".join(problems))
    finally:
        distributed.shutdown()


def check_catalog(ctx, res, save):
    _require_model()
    import h5py

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import catalog as bench  # benchmarks/catalog.py: random model + default judge panel + blob galaxies

    from galcf_hpc.config import load_config

    root = Path(ctx["work"]) / "catalog"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    size = load_config(ctx["config"]).data.image_size
    n = ctx["catalog_galaxies"]
    bench.make_inputs(root, n, size, ctx["config"], judges=True)
    out = root / "out"
    cmd = ["catalog", "run", "--checkpoint", bench.checkpoint(root), "--input", root / "bench.h5", "--out", out]
    cmd += ["--unit-size", ctx["catalog_unit"], "--device", ctx["device"], "--images", "none"]
    t0 = time.perf_counter()
    _run(_galcf(*cmd))
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    with h5py.File(out / "catalog.h5", "r") as f:
        targets = f.attrs.get("targets")
    n_targets = len(targets) if targets is not None else None
    res.update(
        galaxies=summary["num_galaxies"],
        image_size=size,
        targets=n_targets,
        targets_per_galaxy=(n_targets - 1) if n_targets == 10 else n_targets,
        judges=summary.get("judges"),
        images="none",
        unit_size=ctx["catalog_unit"],
        device=summary.get("device"),
        galaxies_per_s=summary["per_rank"][0]["galaxies_per_s"],
        work_seconds=summary["work_seconds"],
        wall_s=wall,
        gpu_hours_8_67M=bench.DESI / summary["per_rank"][0]["galaxies_per_s"] / 3600,
        note="random model and judges (the cost of a pass does not depend on the weights); blob galaxies",
    )


CHILDREN = {
    "setup": check_setup,
    "dali_decode": check_dali_decode,
    "train_throughput": check_train_throughput,
    "bf16_vs_fp32": check_bf16_vs_fp32,
    "deepspeed_zero1": check_deepspeed_zero1,
    "catalog": check_catalog,
}


def child_main(name, work):
    """Run one check in this process; its result (also partial) goes to WORK/result-NAME.json."""
    work = Path(work)
    ctx = json.loads((work / "context.json").read_text())
    path = work / f"result-{name}.json"
    result = {"status": "ok", "reason": None, "results": {}}

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(path)

    try:
        CHILDREN[name](ctx, result["results"], save)
    except Skip as exc:
        result.update(status="skipped", reason=str(exc))
    except Exception as exc:
        traceback.print_exc()
        result.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:500]}")
        result["traceback"] = traceback.format_exc()[-3000:]
    save()
    print(f"[{name}] {result['status']}" + (f": {result['reason']}" if result["reason"] else ""), flush=True)
    return 0


# ----------------------------------------------------------------------------- parent


def run_child(check, budget, work, log):
    """Run ``check`` in its own process (session) and kill it at ``budget`` seconds."""
    path = work / f"result-{check.name}.json"
    path.unlink(missing_ok=True)
    own_log = work / f"log-{check.name}.txt"
    t0 = time.perf_counter()
    with open(own_log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", check.name, "--work", str(work)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            cwd=ROOT,
            start_new_session=True,  # its own process group: a timeout kills its helpers too
        )
        try:
            proc.wait(timeout=budget)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.perf_counter() - t0
    text = own_log.read_text(errors="replace")
    with open(log, "a") as fh:
        fh.write(f"\n===== {check.name} ({seconds:.1f} s, exit {proc.returncode}) =====\n{text}")
    result = json.loads(path.read_text()) if path.is_file() else {"status": "failed", "results": {}}
    if timed_out:
        result.update(
            status="timeout", reason=f"ran past its budget of {budget:.0f} s and was stopped (partial results kept)"
        )
    elif result.get("status") == "failed" and not result.get("reason"):
        tail = text.strip().splitlines()[-1:] or ["no output"]
        result["reason"] = f"exit {proc.returncode}: {tail[0][:300]}"
    result.update(seconds=seconds, budget_s=check.budget_s, measures=check.measures)
    return result


def gpu_info():
    import torch

    if not torch.cuda.is_available():
        return {"name": None}
    props = torch.cuda.get_device_properties(0)
    info = {
        "name": props.name,
        "memory_gib": props.total_memory / 2**30,
        "capability": f"{props.major}.{props.minor}",
        "count_visible": torch.cuda.device_count(),
    }
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]
        info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def versions():
    import importlib.metadata

    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    dali = [d for d in importlib.metadata.distributions() if (d.metadata["Name"] or "").startswith("nvidia-dali")]
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "dali": f"{dali[0].metadata['Name']} {dali[0].version}" if dali else None,
        "deepspeed": version("deepspeed"),
        "freia": version("FrEIA"),
        "galsim": version("GalSim") or version("galsim"),
        "numpy": version("numpy"),
    }
    try:
        sys.path.insert(0, str(ROOT))
        from galcf_hpc import __version__

        out["galcf_hpc"] = __version__
    except Exception:  # noqa: BLE001 - a version string is not worth a crash
        out["galcf_hpc"] = version("galcf-hpc")
    return out


def write_outputs(results, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown_report(results))


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="directory for gpu_check.json/.md/.log")
    ap.add_argument("--dry-run", action="store_true", help="list the checks with their budgets and exit")
    ap.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "galaxy10_decals.yaml"), help="model/training config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--vgg-weights", default=None, help="vgg16-397923af.pth (default: fixed-seed random VGG16)")
    ap.add_argument("--galaxies", type=int, default=600, help="galaxies rendered by the setup")
    ap.add_argument("--size", type=int, default=256, help="cutout size of the rendered galaxies")
    ap.add_argument("--batch-size", type=int, default=32, help="micro-batch (training) and DALI batch")
    ap.add_argument("--threads", type=int, default=4, help="DALI CPU threads in dali_decode")
    ap.add_argument("--warmup", type=int, default=10, help="untimed training steps per feed")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per feed")
    ap.add_argument("--catalog-galaxies", type=int, default=512)
    ap.add_argument("--catalog-unit", type=int, default=128, help="catalog job --unit-size")
    ap.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, help="seconds for setup + all checks")
    ap.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply every budget (slower machines, --allow-cpu tests)"
    )
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work directory (shards, logs)")
    ap.add_argument(
        "--allow-cpu", action="store_true", help="run on the CPU anyway (tests this script; the numbers mean nothing)"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.work)
    selected = CHECKS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {c.name for c in CHECKS}]
        if unknown:
            print(
                f"gpu_check: unknown check(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in CHECKS)}",
                file=sys.stderr,
            )
            return EXIT_NO_GPU
        selected = tuple(c for c in CHECKS if c.name in names)
    if args.dry_run:
        print(plan_text(selected, total=int(args.total_budget)))
        print(f"\nwould write {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}, {args.out / 'gpu_check.log'}")
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            f"gpu_check: no CUDA GPU is visible (torch {torch.__version__}: torch.cuda.is_available() is False). "
            "These checks measure a GPU: run them on a machine with one NVIDIA GPU (docs/gpu_check.md), or "
            "use --dry-run to list them.",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="galcf-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text(f"gpu_check started {start}\n")

    sys.path.insert(0, str(ROOT))
    from galcf_hpc.config import dump_config, load_config
    from galcf_hpc.errors import GalcfError

    overrides = [
        "model.vgg_weights=" + (args.vgg_weights or "null"),
        f"model.vgg_random={'false' if args.vgg_weights else 'true'}",
    ]
    overrides += [
        f"run.out_dir={work / 'run'}",
        f"train.device={device}",
        f"data.device={'gpu' if device == 'cuda' else 'cpu'}",
    ]
    overrides += [f"train.batch_size={args.batch_size}", "train.global_batch=0", "train.grad_accumulation=1", *args.set]
    try:
        cfg = load_config(args.config, overrides)
    except GalcfError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        return EXIT_NO_GPU
    config_path = work / "config.yaml"
    config_path.write_text(dump_config(cfg))
    ctx = {
        "work": str(work),
        "config": str(config_path),
        "device": device,
        "image_size": cfg.data.image_size,
        **{k: getattr(args, k) for k in ("galaxies", "size", "batch_size", "threads", "warmup", "steps")},
        "catalog_galaxies": args.catalog_galaxies,
        "catalog_unit": args.catalog_unit,
    }
    (work / "context.json").write_text(json.dumps(ctx, indent=1))
    results = {
        "schema": SCHEMA,
        "started": start,
        "host": socket.gethostname(),
        "device": device,
        "gpu": gpu_info(),
        "versions": versions(),
        "total_budget_s": args.total_budget,
        "config": {
            "path": str(Path(args.config)),
            "overrides": overrides,
            "image_size": cfg.data.image_size,
            "vgg": args.vgg_weights or "fixed-seed RANDOM VGG16 (no ImageNet weights)",
        },
        "checks": {},
    }
    if device == "cpu":
        results["warning"] = "--allow-cpu: ran on the CPU; the numbers say nothing about a GPU"
    deadline = t0 + args.total_budget * args.budget_scale
    print(plan_text(selected, total=int(args.total_budget)), flush=True)
    # catalog makes its own input; every other check reads the setup's shards
    steps = ((SETUP,) if any(c.name != "catalog" for c in selected) else ()) + tuple(selected)
    try:
        for check in steps:
            left = deadline - time.perf_counter()
            if left < 5:
                entry = {"status": "skipped", "reason": "the total budget was spent", "results": {}}
                entry.update(seconds=0.0, budget_s=check.budget_s, measures=check.measures)
            else:
                budget = min(check.budget_s * args.budget_scale, left)
                print(f"\n[{check.name}] running (budget {budget:.0f} s) ...", flush=True)
                entry = run_child(check, budget, work, log)
            line = f"[{check.name}] {entry['status']} in {entry['seconds']:.1f} s: {headline(check.name, entry)}"
            print(line + (f" ({entry['reason']})" if entry.get("reason") and entry.get("results") else ""), flush=True)
            if check is SETUP:
                results["setup"] = entry
            else:
                results["checks"][check.name] = entry
            results["wall_s"] = time.perf_counter() - t0
            write_outputs(results, out)  # after every check: a killed run keeps what it measured
    finally:
        if not (args.keep_work or args.work):
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + markdown_report(results))
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}, {log}")
    bad = [n for n, c in results["checks"].items() if c["status"] in ("failed", "timeout")]
    if results.get("setup", {}).get("status") in ("failed", "timeout"):
        bad.insert(0, "setup")
    if bad:
        print(f"gpu_check: not completed: {', '.join(bad)} (reasons in the table and {log})", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
