"""The training loop: one process per GPU (or CPU rank), readable top to bottom.

Launcher detection and process groups live in ``distributed.py``, the two engines (PyTorch
DDP and DeepSpeed) in ``engines.py``; this loop drives either the same way: AdamW, linear
warm-up then cosine decay, gradient clipping, gradient accumulation, bf16 on GPU,
evaluation on the validation split after every epoch (rank 0), atomic checkpoints with
every rank's loader and random state, JSON-lines metrics (means over ranks), resume from
the newest complete checkpoint, and a clean stop on SIGUSR1/SIGTERM (checkpoint, then
``scontrol requeue`` under Slurm).

Global batch = ``train.batch_size`` (per-rank micro-batch) x world size x
``train.grad_accumulation``; ``train.global_batch`` fixes the global batch instead and
derives the micro-batch (it must divide evenly). ``train.lr`` is the learning rate of the
global batch as configured: when the global batch changes by a factor k, scale it by k
(linear rule, keep the warm-up) -- docs/distributed.md.
"""

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

from ..config import write_resolved_config
from ..errors import CheckpointError, ConfigError, PeerLostError
from . import distributed
from .engines import build_engine
from ..fileio import write_json
from ..loaders import build_loader
from ..model.galcf import GalaxyCF
from ..model.vgg import load_vgg16
from ..progress import Progress
from .checkpoint import check_compatible, latest_checkpoint, load_checkpoint, rng_state, set_rng_state
from .evaluate import evaluate

log = logging.getLogger("galcf_hpc")


def resolve_device(name):
    """``auto | cpu | cuda`` -> the device of a single-process job (explain, report)."""
    return distributed.resolve_device(name)


def lr_factor(step, total_steps, warmup_steps, min_ratio):
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_perceptual(cfg, device):
    m = cfg.model
    if cfg.loss.perceptual <= 0:
        return None
    return load_vgg16(m.vgg_weights, layers=tuple(m.vgg_layers), allow_random=m.vgg_random,
                      seed=cfg.run.seed).to(device)


def should_stop(train_cfg, started, steps_done):
    """train.time_limit_minutes or train.stop_after_steps reached in this invocation."""
    if train_cfg.stop_after_steps and steps_done >= train_cfg.stop_after_steps:
        return True
    return bool(train_cfg.time_limit_minutes) and time.monotonic() - started > 60 * train_cfg.time_limit_minutes


def append_jsonl(path, record):
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def micro_batch(train_cfg, world_size):
    """(micro-batch per rank, global batch) of ``train_cfg`` on ``world_size`` ranks."""
    t = train_cfg
    if t.global_batch:
        per_step = world_size * t.grad_accumulation
        if t.global_batch % per_step:
            raise ConfigError(f"config key 'train.global_batch': {t.global_batch} is not divisible by world size "
                              f"{world_size} x grad_accumulation {t.grad_accumulation}; choose a global batch that is "
                              f"a multiple of {per_step}, or another number of ranks")
        return t.global_batch // per_step, t.global_batch
    return t.batch_size, t.batch_size * world_size * t.grad_accumulation


def train(cfg, resume=False):
    """Train the model described by ``cfg`` on every rank the launcher started; returns the
    final evaluation dict (on rank 0; None elsewhere, and None when stopped by a signal)."""
    signals = distributed.StopSignals()  # first: a SIGUSR1 from now on stops cleanly instead of killing
    env = distributed.detect(cfg.train.device)
    print(env.describe(), file=sys.stderr, flush=True)
    if not env.is_main:
        logging.getLogger("galcf_hpc").setLevel(logging.WARNING)
    distributed.init_process_group(env, cfg.train.collective_timeout_minutes,
                                   always=cfg.train.engine == "deepspeed")
    try:
        result = _train(cfg, resume, env, signals)
        # leave together: a rank that tears gloo down while rank 0 still evaluates can abort
        distributed.barrier()
        return result
    except RuntimeError as exc:
        if env.world_size > 1 and _PEER_LOST.search(str(exc)):
            newest = latest_checkpoint(cfg.run.out_dir)
            raise PeerLostError(
                f"rank {env.rank}/{env.world_size}: a collective operation failed ({str(exc).splitlines()[0][:240]}); "
                "another rank died or was killed (its own log says why). The newest checkpoint "
                f"({newest or 'none yet'}) is complete: rerun the job with --resume") from None
        raise
    finally:
        signals.restore()
        distributed.shutdown()


_PEER_LOST = re.compile(r"Connection (reset|closed|refused)|Broken pipe|timed out|NCCL (error|communicator)|"
                        r"ProcessGroup|unhandled system error", re.I)


def _rank_states(loader):
    """Every rank's loader position and random state, gathered for the checkpoint."""
    return distributed.gather_objects({"loader": loader.state_dict(), "rng": rng_state()})


def _restore_rank_state(state, loader, env, path):
    ranks = state.get("ranks") or [{"loader": state["loader"], "rng": state["rng"]}]
    if len(ranks) == env.world_size:
        mine = ranks[env.rank]
        loader.load_state_dict(mine["loader"])
        set_rng_state(mine["rng"])
    elif state["loader"]["step"] == 0:  # epoch boundary: any world size may continue
        loader.load_state_dict({**state["loader"], "backend": None})
    else:
        raise CheckpointError(f"{path} was written mid-epoch by {len(ranks)} ranks; this job has {env.world_size}. "
                              f"Resume with {len(ranks)} ranks, or from an epoch-boundary checkpoint")


def _train(cfg, resume, env, signals):
    run_dir = Path(cfg.run.out_dir)
    micro, global_batch = micro_batch(cfg.train, env.world_size)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=micro))
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, run_dir)
    distributed.barrier()
    device = env.device
    threads = cfg.train.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
    if threads > 0 and device.type == "cpu":
        torch.set_num_threads(threads)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)

    loader = build_loader(cfg, "train", rank=env.rank, world_size=env.world_size, train=True)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = GalaxyCF.from_config(cfg).to(device)
    vgg = build_perceptual(cfg, device)
    accum = cfg.train.grad_accumulation
    steps_per_epoch = loader.steps_per_epoch // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"config key 'train.grad_accumulation': {accum} micro-batches per step, but an epoch has "
                          f"only {loader.steps_per_epoch} per rank; lower it or the batch size")
    total_steps = cfg.train.epochs * steps_per_epoch
    engine = build_engine(cfg, model, vgg, env, micro, global_batch,
                          lambda s: lr_factor(s, total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio))
    torch.manual_seed(cfg.run.seed + 1000003 * (env.rank + 1))  # independent noise per rank
    log.info("engine %s on %d rank(s) (%s): micro-batch %d x %d ranks x %d accumulation = global batch %d",
             cfg.train.engine, env.world_size, env.launcher, micro, env.world_size, accum, global_batch)

    step, start_epoch = 0, 0
    if resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            log.info("no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
        else:
            state = load_checkpoint(path)
            check_compatible(model, state["model"], path)
            engine.load(state, path)
            _restore_rank_state(state, loader, env, path)
            step, start_epoch = state["step"], state["loader"]["epoch"]
            log.info("resumed from %s (step %d, epoch %d)", path, step, start_epoch)
    elif latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
                              "or choose another run.out_dir")

    metrics_path = run_dir / "metrics.jsonl"
    started, first_step = time.monotonic(), step
    result, stopped_by = None, None

    def validate():
        eval_loader = build_loader(cfg, cfg.train.eval_split, 0, 1, train=False)
        try:
            return evaluate(model, eval_loader, device, margin=cfg.explain.margin, cf_limit=256)
        finally:
            eval_loader.close()

    def save():
        ranks = _rank_states(loader)
        engine.save(run_dir, step, {"loader": ranks[0]["loader"], "rng": ranks[0]["rng"], "ranks": ranks,
                                    "world_size": env.world_size, "config": cfg.to_dict()})

    for epoch in range(start_epoch, cfg.train.epochs):
        loader.set_epoch(epoch)
        model.train()
        cf_active = epoch >= cfg.loss.cf_warmup_epochs
        bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.train.epochs}") if env.is_main else None
        window, t_window = [], time.monotonic()
        for batch in loader:
            if loader.position > steps_per_epoch * accum:
                continue  # micro-batches left over at the end of the epoch (fewer than grad_accumulation)
            images = batch["images"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            terms = engine.micro_step(images, labels, cf_active, boundary=loader.position % accum == 0)
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(f"loss became {terms['loss']} at step {step} on rank {env.rank} (terms "
                                         f"{terms}); lower train.lr or check the input data with `galcf-hpc data verify`")
            window.append(terms)
            if loader.position % accum:
                continue
            step += 1
            position = loader.position // accum
            if step % cfg.train.log_every == 0 or position == steps_per_epoch:
                keys = sorted(window[-1])
                means = distributed.mean_over_ranks([sum(t.get(k, 0.0) for t in window) / len(window)
                                                     for k in keys], device)
                elapsed = time.monotonic() - t_window
                if env.is_main:
                    append_jsonl(metrics_path, {
                        "kind": "train", "step": step, "epoch": epoch, **dict(zip(keys, means)),
                        "grad_norm": engine.last_grad_norm, "lr": engine.lr(),
                        "images_per_s": len(window) * images.shape[0] * env.world_size / max(elapsed, 1e-9),
                        "elapsed_s": time.monotonic() - started})
                window, t_window = [], time.monotonic()
            if bar:
                bar(position, info=f"loss {terms['loss']:.3f} acc {terms['acc']:.2f}")
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save()
            signalled, limit = distributed.any_rank(
                [signals.received is not None, should_stop(cfg.train, started, step - first_step)], device)
            if signalled or limit:
                stopped_by = stopped_by or (signals.received or "a stop signal" if signalled else None)
                break
        if loader.position != 0:  # stopped mid-epoch: checkpoint and leave
            save()
            log.warning("stopping at step %d (mid-epoch %d)%s; continue with --resume", step, epoch + 1,
                        f" on {stopped_by}" if stopped_by else "")
            break
        if env.is_main:
            result = validate()
            append_jsonl(metrics_path, {"kind": "eval", "step": step, "epoch": epoch, "split": cfg.train.eval_split,
                                        "elapsed_s": time.monotonic() - started, **result.summary()})
            log.info("epoch %d: %s accuracy %.3f, macro-F1 %.3f, counterfactual validity %.3f, "
                     "SSIM(x_cf, x~) %.3f (%d samples)", epoch + 1, cfg.train.eval_split, result.accuracy,
                     result.macro_f1, result.cf_validity, result.cf_ssim, result.cf_count)
        save()
        signalled, limit = distributed.any_rank(
            [signals.received is not None, should_stop(cfg.train, started, step - first_step)], device)
        if signalled or limit:
            stopped_by = signals.received or "a stop signal" if signalled else None
            log.warning("stop condition reached after epoch %d; continue with --resume", epoch + 1)
            break
    loader.close()

    if stopped_by:
        if env.is_main:
            distributed.requeue_slurm_job()
        return None
    if not env.is_main:
        return None
    if result is None:  # resumed a finished run, or stopped before the first evaluation
        result = validate()
    final = {"split": cfg.train.eval_split, "step": step, "train_seconds": time.monotonic() - started,
             **result.to_json()}
    write_json(run_dir / "eval.json", final)
    return final
