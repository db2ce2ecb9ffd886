"""The two training engines behind one interface, chosen by ``train.engine``.

Both wrap ``Objective`` (the model and the frozen VGG16, forward = the batch losses) and
expose ``micro_step(images, labels, cf_active, boundary)`` (forward + backward of one
micro-batch; at an accumulation boundary also clip, step and schedule), ``lr()``,
``last_grad_norm``, ``save(run_dir, step, extra)`` (collective) and ``load(state, path)``.

- ``ddp``: PyTorch DistributedDataParallel (one process alone skips the wrapper), AdamW,
  gradient sync skipped on non-boundary micro-batches (``no_sync``), bf16 autocast on GPU.
  Checkpoint: rank 0 writes one file atomically, every rank loads it.
- ``deepspeed``: ``deepspeed.initialize`` with the same AdamW and schedule, ZeRO stage
  ``train.zero_stage`` (0-2), accumulation, clipping and bf16 autocast from the YAML config.
  Checkpoint: DeepSpeed's own collective save (optimizer partitions per rank) under
  ``checkpoints/deepspeed/<tag>``, then rank 0 writes the usual ``step-*.pt`` with the
  weights and the tag; that file is written last, so its presence marks a complete
  checkpoint. DeepSpeed reads its own files with pickle (``torch.load(weights_only=False)``):
  resume only from run directories this package wrote.
"""

import contextlib
import logging
import shutil

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from . import distributed
from .checkpoint import checkpoint_dir, list_checkpoints, save_checkpoint
from .objective import batch_losses

log = logging.getLogger("galcf_hpc")


class Objective(nn.Module):
    """Model + frozen perceptual network; forward returns (loss, dict of float terms)."""

    def __init__(self, model, vgg, loss_cfg):
        super().__init__()
        self.model = model
        self.vgg = vgg
        self.loss_cfg = loss_cfg

    def forward(self, images, labels, cf_active):
        return batch_losses(self.model, self.vgg, images, labels, self.loss_cfg, cf_active)


def _optimizer(cfg, model, lr_lambda):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def _check_engine(state, name, path):
    saved = state.get("engine", "ddp")
    if saved != name:
        raise CheckpointError(f"{path} was written by the {saved} engine, this run uses {name}; resume with "
                              f"train.engine={saved}, or start a new run.out_dir")


class DDPEngine:
    name = "ddp"

    def __init__(self, cfg, model, vgg, env, lr_lambda):
        self.model, self.env, self.accum = model, env, cfg.train.grad_accumulation
        self.clip = cfg.train.grad_clip
        self.objective = Objective(model, vgg, cfg.loss)
        self.module = self.objective
        if env.world_size > 1:
            self.module = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        self.optimizer, self.scheduler = _optimizer(cfg, model, lr_lambda)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda" and cfg.train.bf16
                         else contextlib.nullcontext())
        self.last_grad_norm = float("nan")

    def micro_step(self, images, labels, cf_active, boundary):
        no_sync = self.module.no_sync() if (not boundary and self.module is not self.objective) else contextlib.nullcontext()
        with no_sync:
            with self.autocast:
                loss, terms = self.module(images, labels, cf_active)
            (loss / self.accum).backward()
        if boundary:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return terms

    def lr(self):
        return self.scheduler.get_last_lr()[0]

    def save(self, run_dir, step, extra):
        if self.env.is_main:
            save_checkpoint(run_dir, step, {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                            "scheduler": self.scheduler.state_dict(), "engine": self.name, **extra})
        distributed.barrier()

    def load(self, state, path):
        _check_engine(state, self.name, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, cfg, model, vgg, env, lr_lambda, micro, global_batch):
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("train.engine is deepspeed but DeepSpeed is not installed; "
                                  "DS_BUILD_OPS=0 pip install 'galcf-hpc[deepspeed]'") from None
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.model, self.env = model, env
        bf16 = env.device.type == "cuda" and cfg.train.bf16
        ds_config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": cfg.train.grad_accumulation,
            "train_batch_size": global_batch,
            "gradient_clipping": cfg.train.grad_clip,
            "zero_optimization": {"stage": cfg.train.zero_stage},
            "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
            "steps_per_print": 1 << 30,
            "zero_allow_untested_optimizer": True,
        }
        for param in model.parameters():  # DeepSpeed broadcasts raw bytes: it needs dense parameters
            param.data = param.data.contiguous()
        optimizer, scheduler = _optimizer(cfg, model, lr_lambda)
        self.objective = Objective(model, vgg, cfg.loss)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.objective, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=[p for p in model.parameters()], dist_init_required=False)
        self.last_grad_norm = float("nan")

    def micro_step(self, images, labels, cf_active, boundary):
        loss, terms = self.engine(images, labels, cf_active)
        self.engine.backward(loss)
        self.engine.step()
        if boundary:
            norm = self.engine.get_global_grad_norm()
            self.last_grad_norm = float(norm) if norm is not None else float("nan")
        return terms

    def lr(self):
        return self.scheduler.get_last_lr()[0]

    def save(self, run_dir, step, extra):
        tag = f"step-{step:08d}"
        ds_dir = checkpoint_dir(run_dir) / "deepspeed"
        self.engine.save_checkpoint(str(ds_dir), tag=tag, client_state={}, save_latest=False)
        distributed.barrier()
        if self.env.is_main:
            save_checkpoint(run_dir, step, {"model": self.model.state_dict(), "engine": self.name,
                                            "deepspeed_tag": tag, **extra})
            keep = {f"step-{int(p.stem.split('-')[1]):08d}" for p in list_checkpoints(run_dir)}
            for old in ds_dir.iterdir():
                if old.is_dir() and old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def load(self, state, path):
        _check_engine(state, self.name, path)
        ds_dir = checkpoint_dir(path.parent.parent) / "deepspeed"
        tag = state["deepspeed_tag"]
        if not (ds_dir / tag).is_dir():
            raise CheckpointError(f"{path} refers to DeepSpeed checkpoint {ds_dir / tag}, which is missing; "
                                  "resume from an older step-*.pt or start a new run.out_dir")
        loaded, _ = self.engine.load_checkpoint(str(ds_dir), tag=tag, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {ds_dir / tag}; resume from an older step-*.pt")


def build_engine(cfg, model, vgg, env, micro, global_batch, lr_lambda):
    if cfg.train.engine == "deepspeed":
        return DeepSpeedEngine(cfg, model, vgg, env, lr_lambda, micro, global_batch)
    return DDPEngine(cfg, model, vgg, env, lr_lambda)
