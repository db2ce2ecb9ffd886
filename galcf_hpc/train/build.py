"""Everything one rank trains with, built the same way for training (``loop.py``) and for
the scaling harness (``scaling/harness.py``): micro-batch and global batch, per-process
settings, the training loader, the model (the same initial weights on every rank), the
frozen perceptual network, and the engine with its learning-rate schedule.

Global batch = ``train.batch_size`` (per-rank micro-batch) x world size x
``train.grad_accumulation``; ``train.global_batch`` fixes the global batch instead and
derives the micro-batch (it must divide evenly). ``train.lr`` is the learning rate of the
global batch as configured: when the global batch changes by a factor k, scale it by k
(linear rule, keep the warm-up) -- docs/distributed.md.
"""

import dataclasses
import logging
import math

import torch

from ..config import Config
from ..errors import ConfigError
from ..loaders import build_loader
from ..model.galcf import GalaxyCF
from ..model.vgg import load_vgg16
from . import distributed
from .distributed import DistEnv
from .engines import Objective, build_engine

log = logging.getLogger("galcf_hpc")


def micro_batch(train_cfg, world_size):
    """(micro-batch per rank, global batch) of ``train_cfg`` on ``world_size`` ranks."""
    t = train_cfg
    if t.global_batch:
        per_step = world_size * t.grad_accumulation
        if t.global_batch % per_step:
            raise ConfigError(
                f"config key 'train.global_batch': {t.global_batch} is not divisible by world size "
                f"{world_size} x grad_accumulation {t.grad_accumulation}; choose a global batch that is "
                f"a multiple of {per_step}, or another number of ranks"
            )
        return t.global_batch // per_step, t.global_batch
    return t.batch_size, t.batch_size * world_size * t.grad_accumulation


def lr_factor(step, total_steps, warmup_steps, min_ratio):
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """How many optimiser steps the learning-rate schedule (and training) lasts: ``planned``
    (``train.epochs`` x steps per epoch) unless :meth:`fit` ends it earlier, at the step a
    time limit reaches (``train.fit_schedule``). The engine's scheduler reads :attr:`total`
    at every step, so a fitted run decays to ``train.min_lr_ratio`` at its last step instead
    of being cut while the rate is still high."""

    def __init__(self, planned, warmup_steps, min_ratio):
        self.planned = self.total = planned
        self.warmup_steps, self.min_ratio = warmup_steps, min_ratio
        self.fitted = False

    def factor(self, step):
        return lr_factor(step, self.total, self.warmup_steps, self.min_ratio)

    def fit(self, total):
        """End at step ``total`` (at most the planned length)."""
        self.total, self.fitted = min(self.planned, int(total)), True


def build_perceptual(model_cfg, loss_cfg, seed, device):
    """The frozen VGG16 of L_R, or None when ``loss.perceptual`` is off."""
    if loss_cfg.perceptual <= 0:
        return None
    return load_vgg16(
        model_cfg.vgg_weights, layers=tuple(model_cfg.vgg_layers), allow_random=model_cfg.vgg_random, seed=seed
    ).to(device)


@dataclasses.dataclass
class Rank:
    """One rank's share of a run (``build_rank``)."""

    cfg: Config  # the run's config with train.batch_size = this rank's micro-batch
    env: DistEnv
    loader: object  # training split, this rank's part
    model: GalaxyCF
    engine: object  # DDPEngine or DeepSpeedEngine
    micro: int
    global_batch: int
    steps_per_epoch: int  # optimiser steps (micro-batches // train.grad_accumulation)
    schedule: Schedule  # the learning-rate schedule's length (train.fit_schedule may shorten it)


def build_rank(cfg, env):
    """Build this rank's loader, model and engine from ``cfg``; every rank starts from the
    same weights (seed ``run.seed``) and then draws its own noise (seed per rank)."""
    micro, global_batch = micro_batch(cfg.train, env.world_size)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=micro))
    t = cfg.train
    distributed.configure_process(env, t.threads, cfg.run.deterministic)
    loader = build_loader(cfg, "train", rank=env.rank, world_size=env.world_size, train=True)
    steps_per_epoch = loader.steps_per_epoch // t.grad_accumulation
    if steps_per_epoch == 0:
        loader.close()
        raise ConfigError(
            f"config key 'train.grad_accumulation': {t.grad_accumulation} micro-batches per step, but "
            f"an epoch has only {loader.steps_per_epoch} per rank; lower it or the batch size"
        )
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = GalaxyCF.from_config(cfg).to(env.device)
    objective = Objective(model, build_perceptual(cfg.model, cfg.loss, cfg.run.seed, env.device), cfg.loss)
    schedule = Schedule(t.epochs * steps_per_epoch, t.warmup_steps, t.min_lr_ratio)
    # a plain function (LambdaLR saves the attributes of a callable object with its state, and
    # would restore an old length over the config's)
    engine = build_engine(t, objective, env, micro, global_batch, lambda s: schedule.factor(s))
    torch.manual_seed(cfg.run.seed + 1000003 * (env.rank + 1))  # independent noise per rank
    log.info(
        "engine %s on %d rank(s) (%s): micro-batch %d x %d ranks x %d accumulation = global batch %d",
        t.engine,
        env.world_size,
        env.launcher,
        micro,
        env.world_size,
        t.grad_accumulation,
        global_batch,
    )
    return Rank(cfg, env, loader, model, engine, micro, global_batch, steps_per_epoch, schedule)
