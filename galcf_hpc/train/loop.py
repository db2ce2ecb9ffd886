"""Single-process training loop (CPU or one GPU), readable top to bottom.

AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on GPU,
evaluation on the validation split after every epoch, atomic checkpoints, JSON-lines
metrics, resume from the newest checkpoint.
"""

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from ..config import write_resolved_config
from ..errors import CheckpointError, ConfigError
from ..fileio import write_json
from ..loaders import build_loader
from ..model.galcf import GalaxyCF
from ..model.vgg import load_vgg16
from ..progress import Progress
from .checkpoint import check_compatible, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .evaluate import evaluate
from .objective import batch_losses

log = logging.getLogger("galcf_hpc")


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'train.device': cuda requested but no GPU is visible; use auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


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


def train(cfg, resume=False):
    """Train the model described by ``cfg``; returns the final evaluation dict."""
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, run_dir)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)

    loader = build_loader(cfg, "train", rank=0, world_size=1, train=True)
    model = GalaxyCF.from_config(cfg).to(device)
    vgg = build_perceptual(cfg, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    total_steps = cfg.train.epochs * loader.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio))

    step, start_epoch = 0, 0
    if resume:
        path = latest_checkpoint(run_dir)
        if path is None:
            log.info("no checkpoint in %s: starting from scratch", run_dir / "checkpoints")
        else:
            state = load_checkpoint(path)
            check_compatible(model, state["model"], path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            loader.load_state_dict(state["loader"])
            set_rng_state(state["rng"])
            step, start_epoch = state["step"], state["loader"]["epoch"]
            log.info("resumed from %s (step %d, epoch %d)", path, step, start_epoch)
    elif latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume to continue that run, "
                              "or choose another run.out_dir")

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.train.bf16
                else contextlib.nullcontext())
    metrics_path = run_dir / "metrics.jsonl"
    started, first_step = time.monotonic(), step
    result = None

    def validate():
        eval_loader = build_loader(cfg, cfg.train.eval_split, 0, 1, train=False)
        return evaluate(model, eval_loader, device, margin=cfg.explain.margin, cf_limit=256)

    def save(epoch_state):
        save_checkpoint(run_dir, step, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "loader": epoch_state, "rng": rng_state(),
            "config": cfg.to_dict(),
        })

    for epoch in range(start_epoch, cfg.train.epochs):
        loader.set_epoch(epoch)
        model.train()
        cf_active = epoch >= cfg.loss.cf_warmup_epochs
        bar = Progress(loader.steps_per_epoch, f"epoch {epoch + 1}/{cfg.train.epochs}")
        window, t_window = [], time.monotonic()
        for batch in loader:
            images = batch["images"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with autocast:
                loss, terms = batch_losses(model, vgg, images, labels, cfg.loss, cf_active)
            if not math.isfinite(terms["loss"]):
                raise FloatingPointError(f"loss became {terms['loss']} at step {step} (terms {terms}); "
                                         "lower train.lr or check the input data with `galcf-hpc data verify`")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            window.append(terms)
            position = loader.position
            if step % cfg.train.log_every == 0 or position == loader.steps_per_epoch:
                elapsed = time.monotonic() - t_window
                record = {"kind": "train", "step": step, "epoch": epoch,
                          **{k: sum(t[k] for t in window) / len(window) for k in window[-1]},
                          "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                          "images_per_s": len(window) * images.shape[0] / max(elapsed, 1e-9),
                          "elapsed_s": time.monotonic() - started}
                append_jsonl(metrics_path, record)
                window, t_window = [], time.monotonic()
            bar(position, info=f"loss {terms['loss']:.3f} acc {terms['acc']:.2f}")
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save(loader.state_dict())
            if should_stop(cfg.train, started, step - first_step):
                break
        if loader.position != 0:  # stopped mid-epoch: checkpoint and leave
            save(loader.state_dict())
            log.warning("stopping at step %d (mid-epoch %d); continue with --resume", step, epoch + 1)
            break
        result = validate()
        append_jsonl(metrics_path, {"kind": "eval", "step": step, "epoch": epoch, "split": cfg.train.eval_split,
                                    "elapsed_s": time.monotonic() - started, **result.summary()})
        log.info("epoch %d: %s accuracy %.3f, macro-F1 %.3f, counterfactual validity %.3f, "
                 "SSIM(x_cf, x~) %.3f (%d samples)", epoch + 1, cfg.train.eval_split, result.accuracy,
                 result.macro_f1, result.cf_validity, result.cf_ssim, result.cf_count)
        save(loader.state_dict())
        if should_stop(cfg.train, started, step - first_step):
            log.warning("stop condition reached after epoch %d; continue with --resume", epoch + 1)
            break

    if result is None:  # resumed a finished run
        result = validate()
    final = {"split": cfg.train.eval_split, "step": step, "train_seconds": time.monotonic() - started,
             **result.to_json()}
    write_json(run_dir / "eval.json", final)
    return final
