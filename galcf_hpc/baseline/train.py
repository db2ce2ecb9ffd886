"""Training and evaluation of the baseline CNN on the run's shards, with the run's loader
and augmentation (``galcf_hpc.loaders.build_loader``). Single process."""

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.classes import CLASS_NAMES, NUM_CLASSES
from ..errors import ConfigError
from ..fileio import write_json
from ..loaders import build_loader
from ..progress import Progress
from ..train.evaluate import accuracy, confusion_matrix, macro_f1, per_class_accuracy
from .classifier import BaselineCNN, predict, save_baseline

log = logging.getLogger("galcf_hpc")

DEFAULT_EPOCHS = 25
DEFAULT_LR = 1e-3
DEFAULT_CHANNELS = (16, 32, 64)


def baseline_dir(cfg):
    return Path(cfg.run.out_dir) / "baseline"


def _device(name):
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise ConfigError("--device cuda: no CUDA device visible")
    return torch.device("cpu")


@torch.no_grad()
def evaluate_baseline(model, cfg, split, device):
    """Confusion-matrix metrics of ``model`` on every galaxy of ``split`` (no augmentation)."""
    loader = build_loader(cfg, split, 0, 1, train=False)
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    try:
        for batch in loader:
            keep = batch["valid"]
            if not bool(keep.any()):
                continue
            pred = predict(model, batch["images"][keep].to(device)).cpu()
            cm += confusion_matrix(batch["labels"][keep], pred)
    finally:
        loader.close()
    return {"split": split, "num_galaxies": int(cm.sum()), "accuracy": accuracy(cm),
            "per_class_accuracy": dict(zip(CLASS_NAMES, per_class_accuracy(cm))), "macro_f1": macro_f1(cm),
            "confusion_matrix": cm.tolist()}


def train_baseline(cfg, epochs=DEFAULT_EPOCHS, lr=DEFAULT_LR, channels=DEFAULT_CHANNELS, device="auto",
                   weight_decay=1e-4):
    """Train the baseline on ``cfg``'s train split; writes RUN/baseline/model.pt and eval.json
    (on ``train.eval_split`` and on ``explain.split``) and returns the eval dict."""
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"--lr must be a positive number, got {lr}")
    out = baseline_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    if cfg.train.threads > 0 and dev.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.run.seed + 7919)
    loader = build_loader(cfg, "train", 0, 1, train=True)
    steps = loader.steps_per_epoch
    model = BaselineCNN(channels).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * steps
    warmup = min(50, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    started, history = time.monotonic(), []
    try:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            model.train()
            bar = Progress(steps, f"baseline epoch {epoch + 1}/{epochs}")
            loss_sum = correct = seen = 0
            for i, batch in enumerate(loader):
                images, labels = batch["images"].to(dev), batch["labels"].to(dev)
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"baseline loss became {value} in epoch {epoch + 1}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += value * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
                bar(i + 1, info=f"loss {value:.3f}")
            history.append({"epoch": epoch, "loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)})
            log.info("baseline epoch %d: loss %.3f, train accuracy %.3f", epoch + 1, history[-1]["loss"],
                     history[-1]["train_accuracy"])
    finally:
        loader.close()
    seconds = time.monotonic() - started
    model.eval()
    settings = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "channels": list(channels),
                "batch_size": cfg.train.batch_size, "image_size": cfg.data.image_size, "seed": cfg.run.seed}
    save_baseline(out / "model.pt", model, {"settings": settings})
    result = evaluate_baseline(model, cfg, cfg.train.eval_split, dev)
    splits = {cfg.train.eval_split: result}
    if cfg.explain.split != cfg.train.eval_split:
        splits[cfg.explain.split] = evaluate_baseline(model, cfg, cfg.explain.split, dev)
    summary = {**result, "splits": splits, "settings": settings, "train_seconds": seconds, "history": history,
               "model": "plain CNN: conv-GroupNorm-ReLU blocks, global average pooling, linear "
                        "(independent of the galcf-hpc model)"}
    write_json(out / "eval.json", summary)
    return summary
