"""Training and evaluation of the judge panel on a run's shards. Single process.

Each judge trains on the run's train split through the run's loader (rotation and crop), with
its own seed and its own extra augmentation on top (flips, shifts, noise, PSF-like blur and,
for colour judges, per-band gain), so that it learns morphology that survives changes of
rendering rather than one generator's pixels. Nothing here is imported by
:mod:`galcf_hpc.train` or :mod:`galcf_hpc.model`: the model never trains against a judge.
"""

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.classes import CLASS_NAMES, NUM_CLASSES
from ..device import autocast_precision, resolve_device, training_autocast
from ..errors import UsageError
from ..fileio import write_json
from ..loaders import build_loader
from ..loaders.split import open_split
from ..metrics import classification_summary, confusion_matrix
from ..progress import Progress
from .nets import build_judge, load_judge, predict, save_judge

log = logging.getLogger("galcf_hpc")

PANEL_FILE = "panel.json"


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    """One judge of the panel: architecture family, input (colour or luminance), seed offset
    and the strength of its extra augmentation."""

    name: str
    family: str
    input: str
    seed: int
    # the cosine schedule needs them: 15 epochs gave 0.76-0.78 test accuracy, 30 gave
    # 0.86-0.90 (smoke data, docs/method.md)
    epochs: int = 30
    lr: float = 1e-3
    noise: float = 0.02  # max std of added Gaussian noise
    blur: float = 0.8  # max sigma of the Gaussian PSF-like blur, in pixels of a 64 px image
    shift: int = 2  # max shift (pixels)
    gain: float = 0.1  # max relative per-band gain change (colour judges)
    balanced: bool = True  # class-balanced cross-entropy: no prior against rare classes


# Two architecture families, different seeds and augmentation, one luminance-only judge.
DEFAULT_PANEL = (
    JudgeSpec("cnn", "plain_cnn", "colour", seed=101),
    JudgeSpec("resnet", "resnet", "colour", seed=202, noise=0.03, blur=1.2, gain=0.2),
    JudgeSpec("resnet_grey", "resnet", "luminance", seed=303),
)


def judges_dir(run_dir):
    return Path(run_dir) / "judges"


def judge_channels(image_size):
    """Channels per stage: one stage per halving down to about 4 pixels."""
    stages = max(2, min(5, int(math.log2(max(image_size, 8) // 4))))
    return [min(16 * 2**i, 256) for i in range(stages)]


def _gaussian_blur(x, sigma):
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    w = w / w.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def augment(x, spec, gen):
    """The judge's own augmentation of a batch in [0, 1] (on top of the loader's)."""
    b = x.shape[0]
    dev = x.device

    def u(*shape):
        return torch.rand(*shape, generator=gen).to(dev)

    flip_h, flip_v = u(b) < 0.5, u(b) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
    if spec.shift:
        dx, dy = (int(v) for v in torch.randint(-spec.shift, spec.shift + 1, (2,), generator=gen))
        x = torch.roll(x, (dy, dx), dims=(-2, -1))
    if spec.blur > 0 and float(u(1)) < 0.3:  # a broader PSF; sigma scales with the image size
        x = _gaussian_blur(x, (0.2 + float(u(1)) * spec.blur) * x.shape[-1] / 64)
    if spec.gain > 0 and spec.input == "colour":
        x = x * (1 + spec.gain * (2 * u(b, x.shape[1], 1, 1) - 1))
    if spec.noise > 0:
        x = x + spec.noise * u(b, 1, 1, 1) * torch.randn(x.shape, generator=gen).to(dev)
    return x.clamp(0, 1)


@torch.no_grad()
def evaluate_judge(model, cfg, split, device):
    """Classification numbers of ``model`` on every galaxy of ``split`` (no augmentation)."""
    loader = build_loader(cfg, split, 0, 1, train=False)
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    try:
        for batch in loader:
            keep = batch["valid"]
            if not bool(keep.any()):
                continue
            images = batch["images"][keep.to(batch["images"].device)].to(device)
            cm += confusion_matrix(
                batch["labels"][keep.to(batch["labels"].device)], predict(model, images), NUM_CLASSES
            )
    finally:
        loader.close()
    return {"split": split, **classification_summary(cm, CLASS_NAMES)}


def class_weights(counts, device):
    """Cross-entropy weights N / (C n_c), capped at 10: every class counts as much as every
    other, so a judge asked "is this a cigar?" is not biased by how rare cigars are."""
    counts = torch.as_tensor(counts, dtype=torch.float32)
    w = counts.sum() / (len(counts) * counts.clamp_min(1))
    return w.clamp(max=10.0).to(device)


def _schedule(opt, total):
    warmup = min(50, max(1, total // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )


class _Trainee:
    """One judge being trained: its network, optimiser, schedule, augmentation generator and
    its own stream of the global random numbers (dropout), so that judges trained side by
    side draw what each would draw alone."""

    def __init__(self, cfg, spec, device, epochs, steps, weights, autocast=None):
        self.spec, self.epochs = spec, epochs
        # the forward pass in bf16 where the run trains in bf16 (train.bf16 on a GPU,
        # train.cpu_bf16 on a CPU with native bf16); augmentation, loss and weights stay fp32
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        self.precision = autocast_precision(self.autocast)
        self.out = judges_dir(cfg.run.out_dir) / spec.name
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = device
        with self.own_random_numbers(seed=cfg.run.seed + spec.seed):
            self.gen = torch.Generator().manual_seed(cfg.run.seed + spec.seed)
            self.channels = judge_channels(cfg.data.image_size)
            self.model = build_judge(spec.family, self.channels, spec.input).to(device)
        self.layout = self.model.memory_format(self.precision)  # the same function in any layout
        self.model = self.model.to(memory_format=self.layout)
        self.weights = weights if spec.balanced else None
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr, weight_decay=1e-4)
        self.sched = _schedule(self.opt, epochs * steps)
        self.steps = steps
        self.seconds, self.history = 0.0, []

    @contextlib.contextmanager
    def own_random_numbers(self, seed=None):
        """A context in which the global generators (CPU and this device's) run this judge's
        stream: seeded with ``seed`` the first time, continued from where it left off after."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            else:
                torch.set_rng_state(self._cpu_state)
                if devices:
                    torch.cuda.set_rng_state(self._device_state, self.device)
            try:
                yield
            finally:
                self._cpu_state = torch.get_rng_state()
                if devices:
                    self._device_state = torch.cuda.get_rng_state(self.device)

    def start_epoch(self):
        self.model.train()
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)
        self.seen = 0

    def step(self, images, labels):
        started = time.monotonic()
        with self.own_random_numbers():
            x = augment(images, self.spec, self.gen).contiguous(memory_format=self.layout)
            with self.autocast:
                logits = self.model(x).float()
            loss = F.cross_entropy(logits, labels, weight=self.weights)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
        self.loss_sum += loss.detach() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)
        self.seconds += time.monotonic() - started

    def end_epoch(self, epoch):
        mean_loss = float(self.loss_sum) / max(self.seen, 1)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"judge {self.spec.name}: loss became {mean_loss} in epoch {epoch + 1}")
        self.history.append(
            {"epoch": epoch, "loss": mean_loss, "train_accuracy": float(self.correct) / max(self.seen, 1)}
        )
        log.info(
            "judge %s epoch %d: loss %.3f, train accuracy %.3f",
            self.spec.name,
            epoch + 1,
            mean_loss,
            self.history[-1]["train_accuracy"],
        )

    def finish(self, cfg, loader_seconds):
        """Save the judge and its evaluation (RUN/judges/<name>/{model.pt, eval.json})."""
        self.model.eval()
        settings = {
            **self.spec.__dict__,
            "epochs": self.epochs,
            "channels": self.channels,
            "image_size": cfg.data.image_size,
            "run_seed": cfg.run.seed,
            "batch_size": cfg.judges.batch_size,
            "steps_per_epoch": self.steps,
            "precision": self.precision,
        }
        save_judge(
            self.out / "model.pt",
            self.model,
            {
                "family": self.spec.family,
                "channels": self.channels,
                "input": self.spec.input,
                "num_classes": NUM_CLASSES,
                "depth": 1,
            },
            {"name": self.spec.name, "settings": settings},
        )
        splits = {
            s: evaluate_judge(self.model, cfg, s, self.device)
            for s in dict.fromkeys((cfg.train.eval_split, cfg.explain.split))
        }
        summary = {
            **splits[cfg.explain.split],
            "splits": splits,
            "settings": settings,
            # its own steps, plus the loading of the batches it shared with the judges trained beside it
            "train_seconds": self.seconds + loader_seconds,
            "history": self.history,
            "model": f"{self.spec.family} on {self.spec.input} input (independent of the galcf-hpc model)",
        }
        write_json(self.out / "eval.json", summary)
        return summary


def train_panel(cfg, specs, device, epochs=None):
    """Train the judges of ``specs`` side by side: one pass of the run's loader per epoch feeds
    every judge the same batches (which each judge alone would see too: the loader's order and
    rotations follow the run's seed), each with its own augmentation, optimiser and random
    numbers. Returns {name: eval.json's dict}."""
    # the judges' own batch: train.batch_size is a per-rank micro-batch that depends on how
    # many ranks the run's config was written for
    batched = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=cfg.judges.batch_size))
    loader = build_loader(batched, "train", 0, 1, train=True)
    steps = loader.steps_per_epoch
    counts = open_split(Path(cfg.data.shards) / "train")[0]["class_counts_by_index"]
    weights = class_weights(counts, device)
    autocast = training_autocast(device, cfg.train)  # the run's precision (one warning where it cannot be had)
    trainees = []
    for spec in specs:
        n = epochs if epochs is not None else (cfg.judges.epochs or spec.epochs)
        if n < 1:
            raise UsageError(f"--epochs must be >= 1, got {n}")
        trainees.append(_Trainee(cfg, spec, device, n, steps, weights, autocast))
    names = ", ".join(t.spec.name for t in trainees)
    loader_seconds = 0.0
    try:
        for epoch in range(max(t.epochs for t in trainees)):
            active = [t for t in trainees if epoch < t.epochs]
            loader.set_epoch(epoch)
            for t in active:
                t.start_epoch()
            bar = Progress(steps, f"judges {names} epoch {epoch + 1}")
            waited = time.monotonic()
            for i, batch in enumerate(loader):
                images, labels = batch["images"].to(device), batch["labels"].to(device)
                loader_seconds += time.monotonic() - waited
                for t in active:
                    t.step(images, labels)
                bar(i + 1)
                waited = time.monotonic()
            for t in active:
                t.end_epoch(epoch)
    finally:
        loader.close()
    share = loader_seconds / len(trainees)
    return {t.spec.name: t.finish(cfg, share) for t in trainees}


def train_judges(cfg, names=None, device="auto", epochs=None):
    """Train the panel (or the judges named in ``names``); writes RUN/judges/panel.json."""
    known = {s.name: s for s in DEFAULT_PANEL}
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise UsageError(f"--only: unknown judge(s) {unknown}; the panel has {', '.join(known)}")
    dev = resolve_device(device)
    if cfg.train.threads > 0 and dev.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    specs = [spec for spec in DEFAULT_PANEL if not names or spec.name in names]
    results = train_panel(cfg, specs, dev, epochs)
    panel_path = judges_dir(cfg.run.out_dir) / PANEL_FILE
    panel = json.loads(panel_path.read_text()) if panel_path.is_file() else {}
    panel.update(
        {
            name: {k: r[k] for k in ("split", "accuracy", "macro_f1", "num_galaxies", "model", "train_seconds")}
            for name, r in results.items()
        }
    )
    write_json(panel_path, panel)
    return results


def load_judges(run_dir, device="cpu"):
    """({name: judge} of every trained judge of the run, a note for the user or None)."""
    root = judges_dir(run_dir)
    judges = {}
    for spec in DEFAULT_PANEL:
        path = root / spec.name / "model.pt"
        if path.is_file():
            judges[spec.name], _ = load_judge(path, device)
    missing = [s.name for s in DEFAULT_PANEL if s.name not in judges]
    note = None
    if missing:
        note = (
            f"judge(s) {', '.join(missing)} not trained: validity by independent judges is "
            f"{'incomplete' if judges else 'missing'}; train them with `galcf-hpc judges train --config "
            f"{Path(run_dir) / 'config.yaml'}`"
        )
    return judges, note
