"""Run configuration: typed dataclasses, YAML loading with strict validation, dotted overrides.

One YAML file fully describes a run. Unknown keys and wrongly typed values are errors
that name the key (and suggest the closest valid one). ``--set a.b=value`` overrides
are parsed as YAML scalars and validated the same way. The resolved configuration is
written next to every output (``resolved_config``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import io
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .fileio import write_text


@dataclass
class RunConfig:
    name: str = "run"  # a label for the run (logs, report title)
    out_dir: str = "runs/run"  # run directory: checkpoints, metrics, eval, explanations
    seed: int = 0  # seed of weights, batches, augmentation and counterfactual targets
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower; exact resume tests)
    demo_minutes: float = 0.0  # budget of a whole `galcf-hpc demo` (0 = none): training gets what the rest leaves


@dataclass
class SynthConfig:
    """Synthetic Galaxy10-like catalog rendered with GalSim (``galcf-hpc data synth``/``demo``)."""

    n: int = 3000  # number of galaxies to render
    size: int = 64  # rendered image side in pixels (the loaders crop and resize to data.image_size)
    seed: int = 0  # seed of the catalog: the same seed renders the same galaxies
    balanced: bool = False  # equal class fractions instead of Galaxy10's
    workers: int = 2  # rendering processes


@dataclass
class DataConfig:
    source: str = "data/Galaxy10_DECals.h5"  # astroNN-format catalog the shards are made from
    shards: str = "data/shards"  # directory with train/ val/ test/ shard splits
    synth: SynthConfig = field(default_factory=SynthConfig)  # the synthetic catalog (data synth, demo)
    shard_size: int = 1000  # galaxies per WebDataset tar shard
    image_format: str = "png"  # image encoding in the shards: png | jpeg | jp2 (png and jp2 lossless)
    jpeg_quality: int = 95  # JPEG quality 1-100 when image_format is jpeg
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train, val, test; sum 1
    split_seed: int = 0  # seed of the group-wise split into train/val/test
    match_radius_arcsec: float = 10.0  # cutouts closer than this are one group when splitting
    image_size: int = 64  # model input resolution R (after crop and resize)
    crop_fraction: float = 0.7  # central crop, side fraction; <= 0.707 keeps rotated corners out
    rotation_degrees: float = 180.0  # random rotation in [-deg, +deg]
    augment: bool = True  # random rotation (training batches only); evaluation is never augmented
    loader: str = "torch"  # loader back-end: torch | dali | synthetic | auto (dali on a GPU, else torch)
    device: str = "auto"  # where dali decodes and augments, and synthetic batches live: gpu | cpu | auto
    num_workers: int = 0  # torch: worker processes (0 = in the training process); dali: CPU threads (min 1)


LOADERS = ("torch", "dali", "synthetic", "auto")
ENGINES = ("ddp", "deepspeed")


@dataclass
class ModelConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # one per 2x downsampling
    decoder_depth: int = 1  # residual blocks per decoder stage (the first upsamples)
    z_dim: int = 64  # total latent size, z = [z1, z2]
    z1_dim: int = 32  # class-dependent part fed to the flow
    flow_blocks: int = 8  # FrEIA affine coupling blocks of the flow z1 -> h
    flow_hidden: int = 256  # hidden width of each coupling block's subnetwork
    flow_clamp: float = 2.0  # soft clamp of the coupling blocks' log-scales (stability)
    mean_distance: float = 5.0  # initial pairwise distance of the class means in h
    # 8 = a class that no rotation by 90 degrees or reflection of the image can change
    classify_views: int = 1  # views averaged when classifying: 1 as given, 2 + mirror, 4 rot90s, 8 rot90s and mirrors
    vgg_weights: str | None = None  # torchvision's vgg16-397923af.pth (galcf-hpc weights fetch)
    vgg_random: bool = False  # allow fixed-seed random VGG16 features (smoke/tests only)
    vgg_layers: list[str] = field(  # VGG16 layers compared by the perceptual loss
        default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]
    )


@dataclass
class LossConfig:
    perceptual: float = 1.0  # L_R: VGG16 feature distance
    pixel: float = 300.0  # pixel MSE added to L_R (per-pixel mean: needs a large weight, docs/method.md)
    rec_ssim: float = 0.0  # 1 - SSIM(x~, x) added to L_R: faint arms and bars count as much as the core
    mmd: float = 1.0  # L_MMD(z, N(0, I))
    mmd_bandwidth: float | None = None  # RBF 2*sigma^2; None -> 2 * z_dim
    ib: float = 1.0  # L_IB weight
    beta: float = 3.0  # IB-INN beta
    z1_noise: float = 0.05  # noise added to z1 before the flow (IB-INN)
    cf_consistency: float = 1.0  # re-encoded counterfactuals must land in their target class
    cf_fraction: float = 0.5  # fraction of each batch used for the consistency term
    cf_warmup_epochs: int = 1  # epochs before the consistency term switches on
    cf_margin: float = 1.0  # margin past the decision boundary for training counterfactuals
    cf_proximity: float = 0.0  # L1 distance |x_cf - x~| (minimal, sparse change)
    cf_ssim: float = 0.0  # 1 - SSIM(x_cf, x~) (minimal change of local structure: the similarity reported)
    cf_z2: float = 0.0  # re-encoded z2 of x_cf must stay the galaxy's z2 (class-free content kept)
    cf_placement: str = "boundary"  # boundary | translate | interpolate (random fraction between them)
    cf_augment: bool = False  # re-encode x_cf under random rot90/flip, shift and noise (no pixel codes)
    cf_symmetry: bool = False  # re-encode x_cf under a random rot90/flip only (exact; model.classify_views > 1)
    z2_adversary: float = 0.0  # gradient-reversed class critic on z2: class information must live in z1
    cf_critic: float = 0.0  # a luminance-only critic (trained on real galaxies) must also put x_cf into t
    cf_realism: bool = False  # the critic also learns to tell decoded counterfactuals from galaxies
    cf_critic_colour: float = 0.0  # a second critic, on colour images, must also put x_cf into t
    cf_critic_augment: bool = False  # the critics (not the encoder) read x_cf under a random symmetry
    cf_critic_margin: float = 0.0  # > 0: the critics' terms stop at this logit margin (hinge); 0: cross-entropy
    cf_critic_family: str = "plain"  # plain | residual | both: the critics' architecture family (both: two of each)
    rec_critic: float = 0.0  # the frozen critics must also put x~ into the galaxy's class (morphology survives D)
    rec_features: float = 0.0  # x~ vs x in the frozen critics' stage features (perceptual, learnt on galaxies)
    cf_critic_robust: float = 0.0  # > 0: critics learn from galaxies under a one-step L2 attack of this RMS radius
    rec_adversarial: float = 0.0  # a patch discriminator (real galaxies vs decoded) must take x~ for a galaxy
    cf_adversarial: float = 0.0  # ... and x_cf (the same discriminator; it then also learns from x_cf)


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training split
    batch_size: int = 64  # per-GPU (per-rank) micro-batch
    global_batch: int = 0  # 0 = batch_size x world size x grad_accumulation; else sets the micro-batch
    grad_accumulation: int = 1  # micro-batches per optimiser step
    engine: str = "ddp"  # ddp | deepspeed (one process per GPU either way)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    collective_timeout_minutes: float = 10.0  # a collective waiting longer than this fails the job
    lr: float = 1e-3  # peak AdamW learning rate, for the global batch (after warm-up)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    warmup_steps: int = 100  # linear learning-rate warm-up, optimiser steps
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    grad_clip: float = 5.0  # clip the global gradient norm to this (0 = no clipping)
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # bf16 autocast on GPU (ignored on CPU); the judges train at the run's precision too
    cpu_bf16: bool = False  # bf16 autocast on a CPU with AMX-BF16 or AVX512-BF16, engine ddp (fp32 on other CPUs)
    threads: int = 0  # torch intra-op threads on CPU; 0 = leave torch's default
    log_every: int = 20  # optimiser steps between log lines (and stop-signal checks)
    checkpoint_every: int = 0  # steps; 0 = once per epoch
    tensorboard: bool = False  # also write metrics as TensorBoard scalars to RUN/tensorboard/
    eval_split: str = "val"  # split evaluated after every epoch: train | val | test
    time_limit_minutes: float = 0.0  # stop training (with a checkpoint) after this; 0 = none
    fit_schedule: bool = False  # end the learning-rate schedule at the step train.time_limit_minutes reaches (if set)
    stop_after_steps: int = 0  # stop this invocation (with a checkpoint) after N steps; 0 = none


@dataclass
class JudgesConfig:
    epochs: int = 0  # epochs of every judge of the panel; 0 = each judge's own (30)
    batch_size: int = 64  # the judges' batch: they train in one process, whatever train.batch_size per rank is


@dataclass
class ExplainConfig:
    split: str = "test"  # split explained by `galcf-hpc explain`: train | val | test
    margin: float = 1.0  # distance past the decision boundary in h (unit-variance Gaussians)
    placement: str | float = "boundary"  # boundary | translate | alpha in [0, 1] between them: where h_cf lands
    max_galaxies: int = 0  # 0 = every galaxy of the split
    batch_size: int = 64  # galaxies per explained batch
    background_fraction: float = 0.25  # outer border (side fraction) used for the background check


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)  # name, output directory and seed of the run
    data: DataConfig = field(default_factory=DataConfig)  # catalog, shards, splits, loader and augmentation
    model: ModelConfig = field(default_factory=ModelConfig)  # encoder/decoder, latent split, flow, VGG16
    loss: LossConfig = field(default_factory=LossConfig)  # weights of the training objective's terms
    train: TrainConfig = field(default_factory=TrainConfig)  # optimiser, batches, engine, device, stopping
    explain: ExplainConfig = field(default_factory=ExplainConfig)  # counterfactuals of `galcf-hpc explain`
    judges: JudgesConfig = field(default_factory=JudgesConfig)  # the independent judge panel

    def validate(self):
        m, d = self.model, self.data
        checks = [
            (0 < m.z1_dim < m.z_dim, "model.z1_dim", f"must be in 1..z_dim-1 (z_dim={m.z_dim}), got {m.z1_dim}"),
            (m.z1_dim >= 2, "model.z1_dim", "must be at least 2 (the flow splits z1 in halves)"),
            (
                d.image_size % (2 ** len(m.channels)) == 0 and d.image_size >= 2 ** len(m.channels) * 2,
                "model.channels",
                f"{len(m.channels)} downsamplings need data.image_size divisible by "
                f"{2 ** len(m.channels)} and >= {2 ** len(m.channels) * 2}, got {d.image_size}",
            ),
            (0.1 <= d.crop_fraction <= 1.0, "data.crop_fraction", f"must be in [0.1, 1], got {d.crop_fraction}"),
            (
                len(d.split_fractions) == 3 and abs(sum(d.split_fractions) - 1) < 1e-6 and min(d.split_fractions) >= 0,
                "data.split_fractions",
                f"must be three non-negative numbers summing to 1, got {d.split_fractions}",
            ),
            (self.train.batch_size >= 2, "train.batch_size", "must be >= 2 (MMD needs pairs)"),
            (0.0 <= self.loss.cf_fraction <= 1.0, "loss.cf_fraction", "must be in [0, 1]"),
            *(
                (
                    getattr(self.loss, key) == 0 or self.loss.cf_critic > 0 or self.loss.cf_critic_colour > 0,
                    f"loss.{key}",
                    "needs critics: set loss.cf_critic or loss.cf_critic_colour > 0",
                )
                for key in ("rec_critic", "rec_features")
            ),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"config key '{key}': {msg}")
        _check_choices(self)
        _check_ranges(self)
        return self

    def to_dict(self):
        return dataclasses.asdict(self)


# where a counterfactual's h lands (model/counterfactual.py); alpha in [0, 1] lies between them
PLACEMENTS = ("boundary", "translate")

# architecture families of the model's critics (loss.cf_critic_family, model/critic.py): a
# counterfactual that has to convince networks that see an image differently (pooled plain
# stages against strided residual ones) cannot rely on one family's blind spots
CRITIC_FAMILIES = ("plain", "residual", "both")

# model.classify_views (model/galcf.py dihedral_views): the image as given, with its mirror
# image, its four rotations by 90 degrees, or those and their mirror images
VIEW_COUNTS = (1, 2, 4, 8)

# Keys that take one of a few values.
_CHOICES = {
    "data.loader": LOADERS,
    "data.image_format": ("png", "jpeg", "jp2"),  # data/shards.py IMAGE_FORMATS (also takes "jpg")
    "data.device": ("auto", "cpu", "gpu"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.engine": ENGINES,
    "train.zero_stage": (0, 1, 2),  # ZeRO-3 shards the weights, which this small model does not need
    "train.eval_split": ("train", "val", "test"),
    "explain.split": ("train", "val", "test"),
    "loss.cf_placement": (*PLACEMENTS, "interpolate"),  # interpolate: a random alpha per counterfactual
    "loss.cf_critic_family": CRITIC_FAMILIES,
    "model.classify_views": VIEW_COUNTS,
}


def _lookup(cfg, key):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_choices(cfg):
    for key, choices in _CHOICES.items():
        value = _lookup(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}': must be one of {', '.join(map(str, choices))}, got {value!r}")
    try:
        cfg.explain.placement = placement_choice(cfg.explain.placement)
    except ValueError as exc:
        raise ConfigError(f"config key 'explain.placement': {exc}") from None


def placement_choice(mode):
    """Where a counterfactual's h lands (model/counterfactual.py): ``"boundary"``,
    ``"translate"`` or a fraction alpha in [0, 1] between the two, returned as a float (also
    given as a numeric string, the form a command line or an HDF5 attribute gives). The one
    rule for the config, the CLI and the model; ValueError for anything else."""
    if isinstance(mode, str) and mode in PLACEMENTS:
        return mode
    try:
        alpha = None if isinstance(mode, bool) else float(mode)
    except (TypeError, ValueError):
        alpha = None
    if alpha is None or not 0.0 <= alpha <= 1.0:
        raise ValueError(
            "must be boundary, translate or a number in [0, 1] (that fraction of the way from the "
            f"first to the second), got {mode!r}"
        )
    return alpha


# Allowed ranges of numeric keys: (low, high), None = unbounded; both ends inclusive. Every
# float must also be finite (no NaN or inf) and a list of ints is checked item by item.
_RANGES = {
    "run.seed": (0, 2**63 - 1),
    "data.synth.n": (1, None),
    "data.synth.size": (8, 4096),
    "data.synth.seed": (0, 2**63 - 1),
    "data.synth.workers": (1, 1024),
    "data.shard_size": (1, None),
    "data.jpeg_quality": (1, 100),
    "data.split_seed": (0, 2**63 - 1),
    "data.match_radius_arcsec": (0.0, 3600.0),
    "data.image_size": (8, 4096),
    "data.rotation_degrees": (0.0, 360.0),
    "data.num_workers": (0, None),
    "model.channels": (1, 4096),
    "model.z_dim": (3, 4096),
    "model.decoder_depth": (1, 8),
    "model.flow_blocks": (1, 64),
    "model.flow_hidden": (1, 16384),
    "model.flow_clamp": (0.1, 10.0),
    "model.mean_distance": (1e-3, 1e3),
    "loss.mmd_bandwidth": (1e-6, None),
    "loss.beta": (1e-6, None),
    "loss.cf_warmup_epochs": (0, None),
    "loss.cf_margin": (0.0, 100.0),
    "loss.cf_critic_margin": (0.0, 100.0),
    "loss.cf_critic_robust": (0.0, 1.0),
    "loss.rec_critic": (0.0, None),
    "loss.rec_features": (0.0, None),
    "loss.rec_ssim": (0.0, None),
    "loss.rec_adversarial": (0.0, None),
    "loss.cf_adversarial": (0.0, None),
    "train.epochs": (1, None),
    "train.grad_accumulation": (1, None),
    "train.global_batch": (0, None),  # 0 = batch_size x ranks x grad_accumulation
    "train.collective_timeout_minutes": (0.1, None),
    "train.lr": (1e-12, 10.0),
    "train.weight_decay": (0.0, 10.0),
    "train.warmup_steps": (0, None),
    "train.min_lr_ratio": (0.0, 1.0),
    "train.grad_clip": (0.0, None),
    "train.threads": (0, 1024),
    "train.log_every": (1, None),
    "train.checkpoint_every": (0, None),
    "train.time_limit_minutes": (0.0, None),
    "run.demo_minutes": (0.0, None),
    "train.stop_after_steps": (0, None),
    "explain.margin": (0.0, 100.0),
    "explain.max_galaxies": (0, None),
    "explain.batch_size": (1, None),
    "explain.background_fraction": (0.01, 0.49),
    "judges.epochs": (0, None),  # 0 = each judge's own
    "judges.batch_size": (1, None),
}
_WEIGHTS = ("loss.",)  # other loss numbers are weights: finite and >= 0


def _check_ranges(cfg):
    """Every numeric key finite and within ``_RANGES`` (loss weights >= 0); the error names
    the key, its value and the range."""

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            value, key = getattr(obj, f.name), f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{key}.")
            else:
                yield key, value

    for key, value in walk(cfg, ""):
        items = value if isinstance(value, list) else [value]
        if key == "model.channels" and not items:
            raise ConfigError("config key 'model.channels': needs at least one entry (one per downsampling)")
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"config key '{key}': must be a finite number, got {v}")
            low, high = _RANGES.get(key, (0, None) if key.startswith(_WEIGHTS) else (None, None))
            if (low is not None and v < low) or (high is not None and v > high):
                bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
                raise ConfigError(f"config key '{key}': must be {bounds}, got {v}")


def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key):
    """Check ``value`` against annotation ``tp``; return the value (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass  # try the next member of the union; the error below names them all
        raise ConfigError(f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} for {key}")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls, data, prefix):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with two differences that matter for configuration files:
    floats are read as YAML 1.2 reads them (``1e-3`` and ``3e-4`` are numbers, not the
    strings YAML 1.1 makes of them), and a key given twice in one mapping is an error
    naming the key and its line instead of the last one silently winning."""

    yaml_implicit_resolvers = {first: list(rs) for first, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found key {key!r} twice (first on line {seen[key] + 1}); keep one of them",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


# YAML 1.2 core schema floats: an exponent without a decimal point is still a float. The int
# resolver is registered first, so plain integers stay ints.
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+.0123456789"),
)


def read_yaml(text, name=None):
    """Parse configuration YAML (safe: plain data only; see ``_ConfigLoader``); errors
    point into ``name`` (a file name) when given."""
    stream = io.StringIO(text)
    stream.name = str(name) if name else "<text>"
    return yaml.load(stream, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


def _apply_override(tree, assignment):
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    try:
        value = read_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{assignment}': value is not valid YAML ({exc})") from None
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section in the file
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override '{assignment}': '{part}' is not a section")
    node[parts[-1]] = value


def config_from_dict(data, overrides=()):
    """A validated Config from plain data (the caller's dict is not modified) and
    ``section.key=value`` overrides."""
    tree = copy.deepcopy(data) if data is not None else {}
    if not isinstance(tree, dict):
        raise ConfigError(f"a config is a mapping of sections (run, data, model, ...), got a {type(tree).__name__}")
    for assignment in overrides:
        _apply_override(tree, assignment)
    return _build(Config, tree, "").validate()


def load_config(path, overrides=()):
    """Load, override and validate a YAML config; errors name the file and the key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = read_yaml(text, path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def dump_config(cfg):
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def write_resolved_config(cfg, run_dir):
    """Write the fully resolved config into a run directory (atomically)."""
    write_text(Path(run_dir) / "config.yaml", dump_config(cfg))


def _field_notes(cls):
    """{field name: its inline comment} from the dataclass's source: the comments next to
    the fields are the one description of every key."""
    import inspect

    notes = {}
    for name, note in re.findall(r"^    (\w+): [^\n#]*#\s*([^\n]+)$", inspect.getsource(cls), re.M):
        notes[name] = note.strip()
    return notes


def _all_keys(cls=None, prefix=""):
    """Every dotted key and section of the configuration."""
    cls, keys = cls or Config, []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{f.name}.")
    return keys


def _key_field(key):
    """(dataclass holding the key, its field) for a dotted key; ConfigError with the closest
    valid key otherwise."""
    cls, parts = Config, key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            prefix = ".".join(parts[:i])
            close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.6)
            valid = ", ".join(f"{prefix}.{n}" if prefix else n for n in fields)
            hint = f"did you mean '{close[0]}'?" if close else f"keys here: {valid}"
            raise ConfigError(f"unknown config key '{key}'; {hint}")
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            return cls, fields[part], tp
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' has no sub-keys (asked for '{key}')")
        cls = tp


def explain_key(key, cfg=None):
    """What a config key means: its description, type, default, allowed values or range, and
    its value in ``cfg`` when given. A section (``train``) lists every key of it in one line
    each. Raises ConfigError for an unknown key."""
    owner, f, tp = _key_field(key)
    default = Config()
    if dataclasses.is_dataclass(tp):
        lines = [f"{key}: {_field_notes(owner).get(f.name, 'a section')}"]
        notes = _field_notes(tp)
        for sub in dataclasses.fields(tp):
            value = _lookup(cfg or default, f"{key}.{sub.name}")
            lines.append(f"  {key}.{sub.name} = {value!r}: {notes.get(sub.name, '')}")
        return "\n".join(lines)
    value_default = _lookup(default, key)
    lines = [f"{key}: {_field_notes(owner).get(f.name, '(no description)')}"]
    lines.append(f"  type {_type_name(tp)}, default {value_default!r}")
    if key in _CHOICES:
        lines.append(f"  one of: {', '.join(map(str, _CHOICES[key]))}")
    if key in _RANGES:
        low, high = _RANGES[key]
        lines.append(f"  range: {'-inf' if low is None else low} .. {'inf' if high is None else high} (inclusive)")
    elif key.startswith(_WEIGHTS) and _type_name(tp) == "float":
        lines.append("  range: >= 0 (a loss weight; 0 switches the term off)")
    if cfg is not None:
        lines.append(f"  in this configuration: {_lookup(cfg, key)!r}")
    return "\n".join(lines)
