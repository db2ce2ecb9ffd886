"""The training loop: one process per GPU (or CPU rank), readable top to bottom.

Set-up (batch sizes, loader, model, engine with its schedule) is ``build.build_rank``,
shared with the scaling harness; launcher detection and process groups are in
``distributed.py``, the two engines (PyTorch DDP and DeepSpeed) in ``engines.py``. This loop
drives either the same way: AdamW, linear warm-up then cosine decay, gradient clipping,
gradient accumulation, bf16 on GPU, evaluation on the validation split after every epoch
(rank 0), atomic checkpoints with every rank's loader and random state, JSON-lines metrics
(means over ranks), resume from the newest complete checkpoint, and a clean stop on
SIGUSR1/SIGTERM (checkpoint, then ``scontrol requeue`` under Slurm).

A step never waits for the GPU: the loss terms stay on the device and are summed there over
the log window (``LogWindow``). The ranks sync with the host only every ``train.log_every``
steps, at the end of an epoch, before a checkpoint and at ``train.stop_after_steps``: one
all-reduce of the stacked window means and one ``.tolist()``; a non-finite loss or gradient
norm stops the run there, before anything is saved. Mid-epoch the ranks then agree whether
to stop (a signal on any rank, the time limit: one small all-reduce), so a signal takes
effect within ``train.log_every`` steps; ``train.stop_after_steps`` stops exactly.
"""

import importlib.util
import json
import logging
import math
import re
import sys
import time
from pathlib import Path

import torch

from ..config import write_resolved_config
from ..device import inference_autocast
from ..errors import CheckpointError, ConfigError, PeerLostError
from ..fileio import DirLock, move_aside, write_json
from ..loaders import build_loader, check_labels
from ..progress import Progress
from . import distributed
from .build import build_rank
from .checkpoint import (
    check_compatible,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from .evaluate import evaluate

log = logging.getLogger("galcf_hpc")

TIME_LIMIT, STEP_LIMIT = "train.time_limit_minutes", "train.stop_after_steps"


class LogWindow:
    """Loss terms of the micro-batches since the last log line, summed on the device: adding
    a batch's terms queues two small kernels and never waits for the GPU (nanoGPT reads its
    loss only when it logs)."""

    def __init__(self, last_step):
        self.last_step, self.started = last_step, time.monotonic()  # the window holds steps last_step+1..
        self.keys, self.sums, self.count = None, None, 0

    def add(self, terms):
        if self.keys is None:
            self.keys = sorted(terms)
        values = torch.stack([terms[k].float() for k in self.keys])
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def means(self, grad_norm=None):
        """{term: mean over the window's micro-batches and over ranks, ``grad_norm``: of the
        last step or None}: one all-reduce and one ``.tolist()``, the window's only host sync."""
        local = self.sums / self.count
        if grad_norm is not None:
            local = torch.cat([local, grad_norm.detach().reshape(1).float().to(local.device)])
        values = distributed.mean_over_ranks(local).tolist()
        return {**dict(zip(self.keys, values)), "grad_norm": values[-1] if grad_norm is not None else None}


def check_finite(means, last_step, step):
    """FloatingPointError naming the window if its mean loss or last gradient norm is not
    finite (all ranks see the same means, so all of them stop here)."""
    bad = [k for k in ("loss", "grad_norm") if means.get(k) is not None and not math.isfinite(means[k])]
    if bad:
        raise FloatingPointError(
            f"{' and '.join(bad)} became non-finite ({', '.join(f'{k} {means[k]}' for k in bad)}) in the window of "
            f"steps {last_step + 1}-{step} (mean over ranks; terms {means}); nothing was saved after step {last_step}. "
            "Lower train.lr or check the input data with `galcf-hpc data verify`, then --resume"
        )


def stop_reason(train_cfg, signals, started, steps_done, device, finished=False):
    """Why this invocation stops now, or None; the same answer on every rank (one small
    all-reduce: call it on all ranks at the same step). A stop signal on any rank first (then
    the job is requeued), else ``train.time_limit_minutes``, else ``train.stop_after_steps``;
    the limits not once the schedule has ``finished`` (nothing is left to resume)."""
    t = train_cfg
    timed_out = bool(t.time_limit_minutes) and time.monotonic() - started > 60 * t.time_limit_minutes
    signalled, timed_out = distributed.any_rank([signals.received is not None, timed_out], device)
    if signalled:
        return signals.received or "a stop signal"
    if finished:
        return None
    if timed_out:
        return TIME_LIMIT
    return STEP_LIMIT if t.stop_after_steps and steps_done >= t.stop_after_steps else None


def append_jsonl(path, record):
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _check_tensorboard(t):
    """``train.tensorboard`` needs the tensorboard package: said before step 1, on every rank."""
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "train.tensorboard: true needs the tensorboard package: pip install tensorboard "
            "(or the package's [tensorboard] extra), or set train.tensorboard: false"
        )


class MetricsLog:
    """Where rank 0 writes metrics: ``metrics.jsonl`` always, and with ``train.tensorboard``
    the same numbers as TensorBoard scalars in RUN/tensorboard/ (tag ``<kind>/<name>``,
    x-axis the optimiser step), so one record reaches both."""

    def __init__(self, run_dir, tensorboard=False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, record):
        append_jsonl(self.path, record)
        if self.writer is None:
            return
        for name, value in record.items():
            if name in ("kind", "step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"{record['kind']}/{name}", value, record["step"])
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def train(cfg, resume=False, resume_from=None):
    """Train the model described by ``cfg`` on every rank the launcher started; returns the
    final evaluation dict (on rank 0; None elsewhere, and None when stopped by a signal).
    ``resume_from``: a step number or checkpoint file of the run to resume from (implies
    ``resume``) instead of the newest readable one."""
    resume = resume or resume_from is not None
    signals = distributed.StopSignals()  # first: a SIGUSR1 from now on stops cleanly instead of killing
    env = distributed.detect(cfg.train.device)
    print(env.describe(), file=sys.stderr, flush=True)
    if not env.is_main:
        logging.getLogger("galcf_hpc").setLevel(logging.WARNING)
    distributed.init_process_group(env, cfg.train.collective_timeout_minutes, always=cfg.train.engine == "deepspeed")
    try:
        result = _train(cfg, resume, env, signals, resume_from)
        # leave together: a rank that tears gloo down while rank 0 still evaluates can abort
        distributed.barrier()
        return result
    except RuntimeError as exc:
        if env.world_size > 1 and _PEER_LOST.search(str(exc)):
            newest = latest_checkpoint(cfg.run.out_dir)
            raise PeerLostError(
                f"rank {env.rank}/{env.world_size}: a collective operation failed ({str(exc).splitlines()[0][:240]}); "
                "another rank died or was killed (its own log says why). The newest checkpoint "
                f"({newest or 'none yet'}) is complete: rerun the job with --resume"
            ) from None
        raise
    finally:
        signals.restore()
        distributed.shutdown()


_PEER_LOST = re.compile(
    r"Connection (reset|closed|refused)|Broken pipe|timed out|NCCL (error|communicator)|"
    r"ProcessGroup|unhandled system error",
    re.I,
)


def _resume_state(run_dir, resume_from):
    """(path, state, newer) to resume from: ``resume_from`` (a step number or a checkpoint
    file of this run) exactly, else the newest checkpoint that loads, skipping damaged newer
    ones with a warning. ``newer``: the run's checkpoints after the chosen one, which must
    not count as the run's newest any more (see ``_set_aside``). (None, None, []) when the
    run has none."""
    found = [p.resolve() for p in list_checkpoints(run_dir)]
    if resume_from is not None:
        text = str(resume_from)
        path = (checkpoint_dir(run_dir) / f"step-{int(text):08d}.pt" if text.isdigit() else Path(text)).resolve()
        if path not in found:
            steps = ", ".join(p.stem for p in found) or "none"
            raise CheckpointError(
                f"--resume-from {resume_from}: not a checkpoint of {run_dir} (it has: {steps}); pass a step "
                "number or a checkpoints/step-*.pt file of this run"
            )
        return path, load_checkpoint(path), found[found.index(path) + 1 :]
    errors = []
    for i in range(len(found) - 1, -1, -1):
        try:
            state = load_checkpoint(found[i])
        except CheckpointError as exc:
            errors.append(str(exc))
            log.warning("skipping %s: %s", found[i], exc)
            continue
        if errors:
            log.warning("resuming from %s, an older checkpoint: the newer one(s) could not be read", found[i])
        return found[i], state, found[i + 1 :]
    if errors:
        raise CheckpointError(f"no checkpoint of {run_dir} can be read: " + "; ".join(errors))
    return None, None, []


def _set_aside(paths, why):
    """Rename checkpoints that the resumed run supersedes to ``step-N.pt.<why>``: kept for
    inspection, but no longer the run's newest for explain, the catalog job or a resume."""
    for path in paths:
        target = move_aside(path, why)
        log.warning("set aside %s as %s (the run continues from an earlier step)", path, target.name)


def _start(r, run_dir, resume, resume_from=None):
    """(step, epoch, newer checkpoints to set aside) to start from: with ``resume`` the newest
    readable checkpoint's (or the one ``resume_from`` names), else (0, 0, []) in a run
    directory that holds none."""
    if not resume:
        if latest_checkpoint(run_dir) is not None:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
                "or choose another run.out_dir"
            )
        return 0, 0, []
    path, state, newer = _resume_state(run_dir, resume_from)
    if path is None:
        log.info("no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
        return 0, 0, []
    check_compatible(r.model, state["model"], path)
    fitted = state.get("schedule") or {}
    if fitted.get("fitted") and r.cfg.train.fit_schedule:  # before the engine rebases the rate on it
        r.schedule.fit(fitted["total"])
    r.engine.load(state, path)
    ranks = state.get("ranks") or [{"loader": state["loader"], "rng": state["rng"]}]
    if len(ranks) == r.env.world_size:
        r.loader.load_state_dict(ranks[r.env.rank]["loader"])
        set_rng_state(ranks[r.env.rank]["rng"], r.env.device)
    elif state["loader"]["step"] == 0:  # epoch boundary: any world size may continue
        r.loader.load_state_dict({**state["loader"], "backend": None})
    else:
        raise CheckpointError(
            f"{path} was written mid-epoch by {len(ranks)} ranks; this job has {r.env.world_size}. "
            f"Resume with {len(ranks)} ranks, or from an epoch-boundary checkpoint"
        )
    log.info("resumed from %s (step %d, epoch %d)", path, state["step"], state["loader"]["epoch"])
    changed = _changed_keys(state.get("config") or {}, r.cfg.to_dict())
    if changed and r.env.is_main:
        log.warning("resumed with a changed config (now in config.yaml): %s", "; ".join(changed))
    return state["step"], state["loader"]["epoch"], newer


def _changed_keys(old, new, prefix=""):
    """``section.key old -> new`` for every value that differs between two config trees."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def _save(r, run_dir, step):
    """Checkpoint (collective): weights, optimiser, and every rank's loader position and RNG."""
    ranks = distributed.gather_objects({"loader": r.loader.state_dict(), "rng": rng_state(r.env.device)})
    r.engine.save(
        run_dir,
        step,
        {
            "loader": ranks[0]["loader"],
            "rng": ranks[0]["rng"],
            "ranks": ranks,
            "world_size": r.env.world_size,
            "config": r.cfg.to_dict(),
            "schedule": {"planned": r.schedule.planned, "total": r.schedule.total, "fitted": r.schedule.fitted},
        },
    )


def _validate(cfg, model, device, views=None):
    """Validation on ``train.eval_split``; ``views`` as :func:`evaluate` (default
    ``model.classify_views``)."""
    eval_loader = build_loader(cfg, cfg.train.eval_split, 0, 1, train=False)
    try:
        with inference_autocast(device, cfg.train):  # as explain, report and catalog classify
            return evaluate(model, eval_loader, device, margin=cfg.explain.margin, cf_limit=256, views=views)
    finally:
        eval_loader.close()


def _log(r, window, step, epoch, metrics, started):
    """The window's means (the host sync), checked for non-finite values; rank 0 appends a
    metrics line. Returns the progress bar's text."""
    means = window.means(r.engine.grad_norm())
    check_finite(means, window.last_step, step)
    if r.env.is_main:
        elapsed = max(time.monotonic() - window.started, 1e-9)
        metrics.write(
            {
                "kind": "train",
                "step": step,
                "epoch": epoch,
                **means,
                "lr": r.engine.lr(),
                "images_per_s": window.count * r.micro * r.env.world_size / elapsed,
                "elapsed_s": time.monotonic() - started,
            },
        )
    return f"loss {means['loss']:.3f} acc {means['acc']:.2f}"


def _train(cfg, resume, env, signals, resume_from=None):
    r = build_rank(cfg, env)
    cfg, t = r.cfg, r.cfg.train
    run_dir = Path(cfg.run.out_dir)
    _check_tensorboard(t)
    lock = DirLock(run_dir)
    holder = lock.acquire() if env.is_main else None
    if distributed.any_rank([holder is not None], env.device)[0]:
        raise CheckpointError(
            f"{run_dir} is in use by another training ({holder or 'see rank 0'}, {lock.path}); wait for it, "
            "choose another run.out_dir, or delete the lock file if that process is gone"
        )
    try:
        return _locked(r, run_dir, resume, signals, resume_from)
    finally:
        lock.release()


def _locked(r, run_dir, resume, signals, resume_from):
    cfg, t, env = r.cfg, r.cfg.train, r.env
    # the evaluation split is read at the end of every epoch: a damaged one is said now, and
    # so is a label that is not a class (each rank reads its share of the .cls members)
    build_loader(cfg, t.eval_split, 0, 1, train=False).close()
    for split in dict.fromkeys(("train", t.eval_split)):
        check_labels(cfg, split, env.rank, env.world_size)
    step, start_epoch, newer = _start(r, run_dir, resume, resume_from)
    distributed.barrier()  # every rank has read its checkpoint
    if env.is_main:  # only once the start is accepted: a refused run leaves config.yaml alone
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, run_dir)
        _set_aside(newer, "superseded" if resume_from is not None else "unreadable")
    distributed.barrier()
    metrics = MetricsLog(run_dir, t.tensorboard) if env.is_main else None
    try:
        return _epochs(r, run_dir, step, start_epoch, metrics, signals)
    finally:
        if metrics is not None:
            metrics.close()


def _fit_schedule(r, step, started, pace, metrics):
    """``train.fit_schedule``: end the schedule at the step ``train.time_limit_minutes``
    reaches at this invocation's pace, the mean over its whole epochs with counterfactuals
    (``pace``: their seconds and steps, validation included). Called after
    each of them: the first call fits the schedule, later ones move its end as the mean
    moves, so a run whose epochs become slower ends before the limit cuts it, and one slow
    epoch (another job on the machine for a minute) moves it little. Every rank computes the
    same end from the slowest rank's numbers."""
    t = r.cfg.train
    paces = distributed.gather_objects((pace[0] / pace[1], time.monotonic() - started))
    per_step, elapsed = max(p[0] for p in paces), max(p[1] for p in paces)
    # a 2 % margin: the limit stays a safety net, not the usual end
    reachable = step + int(max(0.0, 0.98 * 60 * t.time_limit_minutes - elapsed) / per_step)
    before, first = r.schedule.total, not r.schedule.fitted
    r.schedule.fit(max(step, reachable))
    if r.env.is_main and (first or r.schedule.total != before):
        log.info(
            "schedule %s to train.time_limit_minutes %g: %.2f s per step, it ends at step %d of the %d planned",
            "fitted" if first else "refitted",
            t.time_limit_minutes,
            per_step,
            r.schedule.total,
            r.schedule.planned,
        )
        metrics.write(
            {
                "kind": "schedule",
                "step": step,
                "seconds_per_step": per_step,
                "total_steps": r.schedule.total,
                "planned_steps": r.schedule.planned,
            }
        )


def _epochs(r, run_dir, step, start_epoch, metrics, signals):
    """The training loop proper, from ``step`` (epoch ``start_epoch``) to the end of the
    schedule or a stop."""
    cfg, t, model, engine, loader, env = r.cfg, r.cfg.train, r.model, r.engine, r.loader, r.env
    device, accum = env.device, t.grad_accumulation
    started, first_step = time.monotonic(), step
    result, reason, validated = None, None, None
    # seconds and steps of this invocation's whole epochs with counterfactuals, while it fits
    # the schedule (none when a checkpoint brought a fitted one: a resume keeps its end)
    pace = None if r.schedule.fitted else [0.0, 0]

    for epoch in range(start_epoch, t.epochs):
        if step >= r.schedule.total:
            break  # a fitted schedule ends before its planned epochs
        epoch_started, whole = time.monotonic(), loader.position == 0
        loader.set_epoch(epoch)
        model.train()
        cf_active = epoch >= cfg.loss.cf_warmup_epochs
        bar = Progress(r.steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}") if env.is_main else None
        window, info = LogWindow(step), ""
        for batch in loader:
            if loader.position > r.steps_per_epoch * accum:
                continue  # micro-batches left over at the end of the epoch (fewer than grad_accumulation)
            images = batch["images"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            window.add(engine.micro_step(images, labels, cf_active, boundary=loader.position % accum == 0))
            if loader.position % accum:
                continue
            step += 1
            end_of_epoch = loader.position == r.steps_per_epoch * accum
            scheduled_end = step >= r.schedule.total
            checkpoint_due = t.checkpoint_every and step % t.checkpoint_every == 0
            # the only host syncs: log (and check for a non-finite loss), then agree on stopping
            if (
                end_of_epoch
                or checkpoint_due
                or step % t.log_every == 0
                or (t.stop_after_steps and step - first_step >= t.stop_after_steps)
                or scheduled_end
            ):
                info = _log(r, window, step, epoch, metrics, started)
                window = LogWindow(step)
                if not end_of_epoch:  # at the end of an epoch: after evaluation and checkpoint
                    reason = stop_reason(t, signals, started, step - first_step, device, scheduled_end)
            if bar:
                bar(loader.position // accum, info=info)
            if reason or (scheduled_end and not end_of_epoch):
                break
            if checkpoint_due:
                _save(r, run_dir, step)
        if loader.position != 0:  # stopped mid-epoch: checkpoint and leave
            _save(r, run_dir, step)
            if reason:
                log.warning("stopping at step %d (mid-epoch %d) on %s; continue with --resume", step, epoch + 1, reason)
            else:
                log.info("the fitted schedule ends at step %d (mid-epoch %d)", step, epoch + 1)
            break
        if env.is_main:
            # every epoch reads each galaxy once; eval.json, at the end, all of model.classify_views
            result, validated = _validate(cfg, model, device, views=1), step
            metrics.write(
                {
                    "kind": "eval",
                    "step": step,
                    "epoch": epoch,
                    "split": t.eval_split,
                    "elapsed_s": time.monotonic() - started,
                    **result.summary(),
                },
            )
            log.info(
                "epoch %d: %s accuracy %.3f, macro-F1 %.3f, counterfactual validity %.3f, "
                "SSIM(x_cf, x~) %.3f (%d samples)",
                epoch + 1,
                t.eval_split,
                result.accuracy,
                result.macro_f1,
                result.cf_validity,
                result.cf_ssim,
                result.cf_count,
            )
        if t.fit_schedule and t.time_limit_minutes and cf_active and whole and pace is not None:
            pace[0], pace[1] = pace[0] + time.monotonic() - epoch_started, pace[1] + r.steps_per_epoch
            _fit_schedule(r, step, started, pace, metrics)
        _save(r, run_dir, step)  # after the fit: the checkpoint keeps the end this epoch gave
        reason = stop_reason(t, signals, started, step - first_step, device, step >= r.schedule.total)
        if reason:
            log.warning("stopping at step %d (after epoch %d) on %s; continue with --resume", step, epoch + 1, reason)
            break
    loader.close()

    if reason not in (None, TIME_LIMIT, STEP_LIMIT):  # a stop signal: requeue, evaluate later
        if env.is_main:
            distributed.requeue_slurm_job()
        return None
    if not env.is_main:
        return None
    if validated != step or cfg.model.classify_views > 1:
        # resumed a finished run, stopped before the first evaluation or mid-epoch, or the
        # model classifies by several views of each galaxy (the epochs' validations read one)
        result = _validate(cfg, model, device)
    final = {
        "split": t.eval_split,
        "step": step,
        "planned_steps": r.schedule.planned,
        "schedule_steps": r.schedule.total,
        "train_seconds": time.monotonic() - started,
        **result.to_json(),
    }
    write_json(run_dir / "eval.json", final)
    return final
