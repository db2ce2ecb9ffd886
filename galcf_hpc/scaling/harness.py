"""``galcf-hpc scaling run``: time training steps on every rank a launcher started.

Started like training (srun, torchrun, mpiexec: one process per GPU or CPU rank), it builds
the loader, model and engine with training's own ``train.build.build_rank``, then

- runs ``warmup`` steps (not timed: allocator, autotuning, DeepSpeed/DDP bucket set-up),
- runs ``repeats`` blocks of ``steps`` timed steps. Per step and rank: data wait (time
  blocked in ``next(loader)`` plus the copy to the device) and compute (forward + backward
  + optimiser step, with the DDP/DeepSpeed gradient all-reduce inside, ``cuda.synchronize``
  on GPU). Per block: wall time between two barriers on rank 0 -> images/s of the job,
- measures communication separately: all-reduces of several sizes up to and including the
  gradient size (``grad_bytes`` = trainable parameters x 4 bytes, fp32 gradients), and
  calibrates the ring model ``t(S) = 2(p-1)/p * S / B + 2(p-1) * alpha`` with them (per-hop
  latency ``alpha`` from the 4-byte all-reduce, bus bandwidth ``B`` from the gradient-size
  one, of this backend on this machine; ``projection.py`` uses them to check its
  prediction against the measured 2-rank run),
- DDP with more than one rank: ``steps`` more steps under ``no_sync`` (no gradient
  all-reduce); median step with sync minus without = the communication the backward pass
  did not hide (``comm_exposed_s``), and the no-sync compute shows how much the ranks slow
  each other down without any communication (shared cores, memory bandwidth),
- peak memory: ``torch.cuda.max_memory_allocated`` on GPU, ``ru_maxrss`` on the CPU,
  maximum over ranks.

Modes: ``weak`` keeps the per-rank micro-batch ``train.batch_size`` (global batch grows
with the ranks); ``strong`` keeps ``train.global_batch`` (must be set) and divides it over
the ranks. One step = one micro-batch = one optimiser step (``train.grad_accumulation`` is
set to 1). The loss includes the counterfactual term (as after ``loss.cf_warmup_epochs``).

Rank 0 appends one JSON line per run to ``--out`` (a single ``write`` + ``fsync`` on a file
opened for appending, so jobs of a sweep can share the file).
"""

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ENGINES, LOADERS
from ..errors import ConfigError, UsageError
from ..train import distributed
from ..train.build import build_rank

log = logging.getLogger("galcf_hpc")

MODES = ("weak", "strong")


def configure(cfg, mode, engine, loader):
    """``cfg`` with the engine, loader and batch set-up of a ``mode`` run."""
    if mode not in MODES:
        raise UsageError(f"--mode {mode!r}: choose weak or strong")
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: choose {' or '.join(ENGINES)}")
    if loader not in LOADERS:
        raise UsageError(f"--loader {loader!r}: choose {', '.join(LOADERS)}")
    t = cfg.train
    if mode == "strong" and t.global_batch <= 0:
        raise ConfigError(
            "--mode strong needs a fixed global batch: set train.global_batch (e.g. --set "
            "train.global_batch=256), a multiple of every GPU count of the study"
        )
    train = dataclasses.replace(
        t, engine=engine, grad_accumulation=1, global_batch=t.global_batch if mode == "strong" else 0
    )
    return dataclasses.replace(cfg, train=train, data=dataclasses.replace(cfg.data, loader=loader))


def endless(loader):
    """Batches across epoch boundaries (a timed block may span the end of an epoch)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ConfigError("the training split gives no full batch per rank; use a smaller batch or more data")
        epoch += 1


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_ring(points, world):
    """(bus bandwidth B in bytes/s, per-hop latency alpha in s) of the ring model
    ``t(S) = 2(p-1)/p S/B + 2(p-1) alpha`` from (bytes, seconds) points: alpha from the
    smallest message (its bandwidth term is negligible), B from the largest one (the
    gradient). (None, None) with one rank; B None if the large message was not slower."""
    if world < 2 or len(points) < 2:
        return None, None
    (_, t0), (s1, t1) = min(points), max(points)
    alpha = t0 / (2 * (world - 1))
    rest = t1 - 2 * (world - 1) * alpha
    bandwidth = 2 * (world - 1) / world * s1 / rest if rest > 0 else None
    return bandwidth, alpha


def allreduce_bench(grad_bytes, device, trials=7, per_trial=10):
    """Time per all-reduce of float32 buffers of 4 bytes (latency), 64 KiB, 1 MiB, 1/4 of the
    gradient and the gradient size: ``per_trial`` back-to-back all-reduces after a barrier
    (amortising the skew between ranks leaving the barrier), median over ``trials``, the
    slowest rank's value. [] with one rank."""
    if not distributed.active():
        return []
    sizes = sorted({4, 1 << 16, 1 << 20, max(4, grad_bytes // 4 // 4 * 4), max(4, grad_bytes // 4 * 4)})
    out = []
    for nbytes in sizes:
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        for _ in range(3):
            dist.all_reduce(buf)
        _sync(device)
        times = []
        for _ in range(trials):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(per_trial):
                dist.all_reduce(buf)
            _sync(device)
            times.append((time.perf_counter() - t0) / per_trial)
        # a collective ends for all when the last rank finishes: take the slowest rank's time
        t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.append({"bytes": nbytes, "seconds": float(t.item())})
    return out


def software_versions():
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "galcf_hpc": _version("galcf-hpc"),
    }
    versions["deepspeed"] = _version("deepspeed")
    dali = [d for d in importlib.metadata.distributions() if (d.metadata["Name"] or "").startswith("nvidia-dali")]
    versions["dali"] = f"{dali[0].metadata['Name']} {dali[0].version}" if dali else None
    if dist.is_initialized() and torch.cuda.is_available():
        versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return versions


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def peak_memory_bytes(device):
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def append_record(path, record):
    """One JSON line, one write, fsync: lines of concurrent writers do not interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def run_scaling(
    cfg,
    mode="weak",
    engine="ddp",
    loader="synthetic",
    steps=20,
    warmup=5,
    repeats=3,
    out="runs/scaling/results.jsonl",
    config_path=None,
):
    """Time this rank's share of a scaling run; rank 0 appends the record to ``out`` and
    returns it (None on other ranks)."""
    if steps < 1 or repeats < 1 or warmup < 0:
        raise UsageError(f"--steps {steps}, --repeats {repeats} must be >= 1 and --warmup {warmup} >= 0")
    cfg = configure(cfg, mode, engine, loader)
    env = distributed.detect(cfg.train.device)
    print(env.describe(), file=sys.stderr, flush=True)
    if not env.is_main:
        logging.getLogger("galcf_hpc").setLevel(logging.WARNING)
    distributed.init_process_group(env, cfg.train.collective_timeout_minutes, always=engine == "deepspeed")
    try:
        return _run(cfg, env, mode, steps, warmup, repeats, out, config_path)
    finally:
        distributed.shutdown()


def time_steps(built, steps, warmup, repeats):
    """``warmup`` untimed steps, then ``repeats`` blocks of ``steps`` timed steps: [{wall_s,
    data_s, compute_s, compute_steps}] per block; and for DDP with several ranks the median
    compute step under ``no_sync`` (else None)."""
    device, engine, batches = built.env.device, built.engine, endless(built.loader)
    built.model.train()

    def step():
        t0 = time.perf_counter()
        batch = next(batches)
        images = batch["images"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        _sync(device)
        t1 = time.perf_counter()
        engine.micro_step(images, labels, True, boundary=True)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    for _ in range(warmup):
        step()
    blocks = []
    for _ in range(repeats):
        distributed.barrier()
        t0 = time.perf_counter()
        times = [step() for _ in range(steps)]
        distributed.barrier()
        wall = time.perf_counter() - t0
        blocks.append(
            {
                "wall_s": wall,
                "data_s": sum(t[0] for t in times) / steps,
                "compute_s": sum(t[1] for t in times) / steps,
                "compute_steps": [t[1] for t in times],
            }
        )
    # DDP only: the same steps without the gradient all-reduce (no_sync); step - no_sync step
    # = the communication the backward pass did not hide. Last, as ranks' weights diverge.
    nosync = None
    if built.cfg.train.engine == "ddp" and built.env.world_size > 1:
        with engine.module.no_sync():
            distributed.barrier()
            nosync = statistics.median(step()[1] for _ in range(steps))
    return blocks, nosync


def _run(cfg, env, mode, steps, warmup, repeats, out, config_path):
    device = env.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    built = build_rank(cfg, env)
    cfg, micro, global_batch = built.cfg, built.micro, built.global_batch
    params = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    grad_bytes = 4 * params
    log.info(
        "scaling %s: %s engine, %s loader, %d rank(s), micro-batch %d, global batch %d, %d parameters",
        mode,
        cfg.train.engine,
        cfg.data.loader,
        env.world_size,
        micro,
        global_batch,
        params,
    )
    try:
        blocks, nosync = time_steps(built, steps, warmup, repeats)
    finally:
        built.loader.close()
    bench = allreduce_bench(grad_bytes, device)
    grad_ar = next((b["seconds"] for b in bench if b["bytes"] == max(4, grad_bytes // 4 * 4)), None)

    mine = {
        "host": socket.gethostname(),
        "device": device_name(device),
        "peak_memory_bytes": peak_memory_bytes(device),
        "data_s": [b["data_s"] for b in blocks],
        "compute_s": [b["compute_s"] for b in blocks],
        "compute_nosync_s": nosync,
        "compute_median_s": statistics.median(t for b in blocks for t in b["compute_steps"]),
    }
    ranks = distributed.gather_objects(mine)
    if not env.is_main:
        return None

    record = _record(built, env, mode, (steps, warmup, repeats), config_path, blocks, ranks, bench, grad_ar)
    rates = record["images_per_s_repeats"]
    append_record(out, record)
    log.info(
        "scaling %s, %d rank(s): %.1f images/s (repeats %s), step %.4f s (data %.4f, compute %.4f), "
        "gradient all-reduce %s -> %s",
        mode,
        env.world_size,
        record["images_per_s"],
        ", ".join(f"{r:.1f}" for r in rates),
        record["step_s"],
        record["data_s"],
        record["compute_s"],
        f"{grad_ar:.4f} s" if grad_ar is not None else "n/a (1 rank)",
        out,
    )
    return record


def _record(built, env, mode, timing, config_path, blocks, ranks, bench, grad_ar):
    """The JSON record of one scaling measurement (rank 0): the job's images/s, per-step data
    and compute time over ranks, communication, memory, and what produced them."""
    steps, warmup, repeats = timing
    cfg, device, micro, global_batch = built.cfg, env.device, built.micro, built.global_batch
    params = sum(p.numel() for p in built.model.parameters() if p.requires_grad)
    bandwidth, latency = fit_ring([(b["bytes"], b["seconds"]) for b in bench], env.world_size)
    rates = [steps * global_batch / b["wall_s"] for b in blocks]
    nosyncs = all(r["compute_nosync_s"] is not None for r in ranks)
    per_rank_data = [statistics.median(r["data_s"]) for r in ranks]  # median over repeats, like images/s
    per_rank_compute = [statistics.median(r["compute_s"]) for r in ranks]
    hosts = sorted({r["host"] for r in ranks})
    slurm_nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    record = {
        "kind": "scaling",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": mode,
        "engine": cfg.train.engine,
        "loader": cfg.data.loader,
        "zero_stage": cfg.train.zero_stage,
        "config": str(config_path) if config_path else None,
        "run_name": cfg.run.name,
        "image_size": cfg.data.image_size,
        "world_size": env.world_size,
        "nodes": int(slurm_nodes) if slurm_nodes else len(hosts),
        "hosts": hosts,
        "launcher": env.launcher,
        "backend": env.backend if env.world_size > 1 else None,
        "device_type": device.type,
        "devices": sorted({r["device"] for r in ranks}),
        "threads_per_rank": torch.get_num_threads(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "micro_batch": micro,
        "global_batch": global_batch,
        "parameters": params,
        "grad_bytes": 4 * params,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        # throughput of the job (global images per wall second), one value per repeat
        "images_per_s": statistics.median(rates),
        "images_per_s_repeats": rates,
        "images_per_s_min": min(rates),
        "images_per_s_max": max(rates),
        "step_s": statistics.median(b["wall_s"] / steps for b in blocks),
        # per step: mean over the steps of a repeat, median over repeats, mean over ranks (max: slowest rank)
        "data_s": statistics.mean(per_rank_data),
        "data_s_max": max(per_rank_data),
        "compute_s": statistics.mean(per_rank_compute),
        "compute_s_max": max(per_rank_compute),
        "data_share": statistics.mean(per_rank_data)
        / (statistics.mean(per_rank_data) + statistics.mean(per_rank_compute)),
        # DDP, >1 rank: median compute step without gradient sync, and the exposed communication
        # estimated as median step with sync - without (mean over ranks)
        "compute_nosync_s": (statistics.mean(r["compute_nosync_s"] for r in ranks) if nosyncs else None),
        "comm_exposed_s": (
            statistics.mean(r["compute_median_s"] - r["compute_nosync_s"] for r in ranks) if nosyncs else None
        ),
        "allreduce_grad_s": grad_ar,
        "allreduce_bench": bench,
        "comm_bandwidth_Bps": bandwidth,
        "comm_latency_s": latency,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in ranks),
        "peak_memory_kind": "cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss",
        "versions": software_versions(),
    }
    return record
