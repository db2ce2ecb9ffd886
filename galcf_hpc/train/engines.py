"""The two training engines behind one interface, chosen by ``train.engine``.

Both wrap ``Objective`` (the model and the frozen VGG16, forward = the batch losses), take
the ``train`` config section only, and expose ``micro_step(images, labels, cf_active,
boundary)`` (forward + backward of one micro-batch; at an accumulation boundary also clip,
step and schedule; returns the loss terms as detached tensors on the device: nothing waits
for the GPU), ``lr()``, ``grad_norm()`` (of the last step, a tensor on the device or None;
read when logging), ``save(run_dir, step, extra)`` (collective) and ``load(state, path)``.

- ``ddp``: PyTorch DistributedDataParallel (one process alone skips the wrapper), AdamW,
  gradient sync skipped on non-boundary micro-batches (``no_sync``), bf16 autocast on GPU
  (and with ``train.cpu_bf16`` on a CPU with native bf16).
  Checkpoint: rank 0 writes one file atomically, every rank loads it.
- ``deepspeed``: ``deepspeed.initialize`` with the same AdamW and schedule, ZeRO stage
  ``train.zero_stage`` (0-2), accumulation, clipping and bf16 autocast (``torch_autocast``)
  from the YAML config; gradients are reduced in fp32 also under bf16 autocast.
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

from ..device import training_autocast
from ..errors import CheckpointError, ConfigError
from ..fileio import file_sha256
from . import distributed
from .checkpoint import checkpoint_dir, deepspeed_states, list_checkpoints, save_checkpoint
from .objective import batch_losses

log = logging.getLogger("galcf_hpc")


class Objective(nn.Module):
    """Model + frozen perceptual network; forward returns (loss, dict of detached terms)."""

    def __init__(self, model, vgg, loss_cfg):
        super().__init__()
        self.model = model
        self.vgg = vgg
        self.loss_cfg = loss_cfg

    def forward(self, images, labels, cf_active):
        return batch_losses(self.model, self.vgg, images, labels, self.loss_cfg, cf_active)


def _optimizer(train_cfg, model, lr_lambda):
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def _rebase(scheduler, train_cfg):
    """After loading a checkpoint: continue the schedule from the config's ``train.lr`` and
    ``train.weight_decay`` (a resume may change them, e.g. a lower rate after a divergence),
    at the loaded step. The loaded optimiser state (moments) is kept."""
    scheduler.base_lrs = [train_cfg.lr] * len(scheduler.base_lrs)
    values = [train_cfg.lr * f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, value in zip(scheduler.optimizer.param_groups, values):
        group.update(initial_lr=train_cfg.lr, lr=value, weight_decay=train_cfg.weight_decay)
    scheduler._last_lr = values


def _check_engine(state, name, path):
    saved = state.get("engine", "ddp")
    if saved != name:
        raise CheckpointError(
            f"{path} was written by the {saved} engine, this run uses {name}; resume with "
            f"train.engine={saved}, or start a new run.out_dir"
        )


class DDPEngine:
    name = "ddp"

    def __init__(self, train_cfg, objective, env, lr_lambda):
        self.objective, self.model, self.env, self.train_cfg = objective, objective.model, env, train_cfg
        self.accum, self.clip = train_cfg.grad_accumulation, train_cfg.grad_clip
        self.module = self.objective
        if env.world_size > 1:
            self.module = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[env.device.index] if env.device.type == "cuda" else None
            )
        self.optimizer, self.scheduler = _optimizer(train_cfg, self.model, lr_lambda)
        self.autocast = training_autocast(env.device, train_cfg)
        self._grad_norm = None

    def micro_step(self, images, labels, cf_active, boundary):
        skip_sync = not boundary and self.module is not self.objective  # DDP inside an accumulation window
        no_sync = self.module.no_sync() if skip_sync else contextlib.nullcontext()
        with no_sync:
            with self.autocast:
                loss, terms = self.module(images, labels, cf_active)
            (loss / self.accum).backward()
        if boundary:
            self._grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)  # a tensor: no sync
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return terms

    def grad_norm(self):
        return self._grad_norm

    def lr(self):
        return self.scheduler.get_last_lr()[0]

    def save(self, run_dir, step, extra):
        if self.env.is_main:
            save_checkpoint(
                run_dir,
                step,
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "engine": self.name,
                    **extra,
                },
            )
        distributed.barrier()

    def load(self, state, path):
        _check_engine(state, self.name, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _rebase(self.scheduler, self.train_cfg)


def deepspeed_config(train_cfg, micro, global_batch, bf16):
    """The DeepSpeed config of a run. bf16 is torch autocast (fp32 master weights). Gradients
    are all-reduced in fp32: ``communication_data_type`` for ZeRO-0, and an empty
    ``lower_precision_safe_modules`` because with ``torch_autocast`` ZeRO-1/2 would otherwise
    reduce the gradients of Linear and Conv layers in bf16 and ignore the former."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": train_cfg.grad_accumulation,
        "train_batch_size": global_batch,
        "gradient_clipping": train_cfg.grad_clip,
        "zero_optimization": {"stage": train_cfg.zero_stage},
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "communication_data_type": "fp32",
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,
    }


def _import_deepspeed():
    """DeepSpeed, checked for the ``torch_autocast`` setting this package's bf16 relies on."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "train.engine is deepspeed but DeepSpeed is not installed; "
            "DS_BUILD_OPS=0 pip install 'galcf-hpc[deepspeed]'"
        ) from None
    from deepspeed.runtime import constants

    if not hasattr(constants, "TORCH_AUTOCAST"):
        raise ConfigError(
            f"train.engine is deepspeed, but the installed DeepSpeed {deepspeed.__version__} does not "
            "know the 'torch_autocast' setting (bf16 training); upgrade it: "
            "DS_BUILD_OPS=0 pip install -U 'galcf-hpc[deepspeed]'"
        )
    return deepspeed


def check_precision(engine, config):
    """Raise a ConfigError unless the initialised DeepSpeed ``engine`` runs the precision its
    ``config`` asks for: torch autocast on (bf16) or off as configured, and every gradient
    all-reduced in fp32. DeepSpeed ignores config sections it does not know, so a version
    without ``torch_autocast`` would train in fp32 without a word, and a
    ``lower_precision_safe_modules`` list left at DeepSpeed's default would reduce the
    gradients of Linear and Conv layers in bf16 under ZeRO-1/2."""
    from deepspeed.runtime.torch_autocast import PARAM_COMM_DTYPE_ATTR_NAME

    wanted = bool(config["torch_autocast"]["enabled"])
    problems = []
    if bool(engine.torch_autocast_enabled()) != wanted:
        problems.append(f"torch autocast is {'off' if wanted else 'on'} (configured: {'on' if wanted else 'off'})")
    elif wanted and engine.torch_autocast_dtype() != torch.bfloat16:
        problems.append(f"autocast computes in {engine.torch_autocast_dtype()}, not bfloat16")
    if engine.communication_data_type != torch.float32:
        problems.append(f"gradients are all-reduced in {engine.communication_data_type}")
    low = sorted(
        {
            f"{type(m).__name__} ({getattr(p, PARAM_COMM_DTYPE_ATTR_NAME)})"
            for m in engine.module.modules()
            for p in m.parameters(recurse=False)
            if getattr(p, PARAM_COMM_DTYPE_ATTR_NAME, torch.float32) != torch.float32
        }
    )
    if low:
        problems.append(f"the gradients of {', '.join(low)} layers are reduced in lower precision")
    if problems:
        import deepspeed

        raise ConfigError(
            f"DeepSpeed {deepspeed.__version__} did not take this package's precision settings: "
            f"{'; '.join(problems)}. Install a DeepSpeed this package supports (setup.py: the deepspeed "
            "extra) or use train.engine: ddp"
        )


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, train_cfg, objective, env, lr_lambda, micro, global_batch):
        deepspeed = _import_deepspeed()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.objective, self.model, self.env, self.train_cfg = objective, objective.model, env, train_cfg
        config = deepspeed_config(train_cfg, micro, global_batch, env.device.type == "cuda" and train_cfg.bf16)
        if env.device.type == "cpu" and train_cfg.cpu_bf16 and env.is_main:
            log.warning("train.cpu_bf16 is for train.engine ddp: DeepSpeed on the CPU trains in fp32")
        for param in self.model.parameters():  # DeepSpeed broadcasts raw bytes: it needs dense parameters
            param.data = param.data.contiguous()
        optimizer, scheduler = _optimizer(train_cfg, self.model, lr_lambda)
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)
        with distributed.local_rank_of(env.device):  # DeepSpeed picks its GPU from LOCAL_RANK
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=objective,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=config,
                model_parameters=list(self.model.parameters()),
                dist_init_required=False,
            )
        check_precision(self.engine, config)

    def micro_step(self, images, labels, cf_active, boundary):
        loss, terms = self.engine(images, labels, cf_active)
        self.engine.backward(loss)
        self.engine.step()
        return terms

    def grad_norm(self):
        """None where DeepSpeed does not compute one (ZeRO-0 without bf16 clips in torch)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(norm, dtype=torch.float32, device=self.env.device)

    def lr(self):
        return self.scheduler.get_last_lr()[0]

    def save(self, run_dir, step, extra):
        tag = f"step-{step:08d}"
        ds_dir = checkpoint_dir(run_dir) / "deepspeed"
        self.engine.save_checkpoint(str(ds_dir), tag=tag, client_state={}, save_latest=False)
        distributed.barrier()
        if self.env.is_main:
            # the sha256 of every file DeepSpeed wrote: a resume hands DeepSpeed only these files
            files = {p.name: file_sha256(p) for p in sorted((ds_dir / tag).iterdir()) if p.is_file()}
            payload = {"model": self.model.state_dict(), "engine": self.name, "deepspeed_tag": tag}
            save_checkpoint(run_dir, step, {**payload, "deepspeed_files": files, **extra})
            keep = {f"step-{int(p.stem.split('-')[1]):08d}" for p in list_checkpoints(run_dir)}
            for old in ds_dir.iterdir():
                if old.is_dir() and old.name not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def load(self, state, path):
        _check_engine(state, self.name, path)
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        ds_dir = deepspeed_states(path, state, (LossScaler, ZeroStageEnum, fragment_address))
        tag = state["deepspeed_tag"]
        loaded, _ = self.engine.load_checkpoint(
            str(ds_dir), tag=tag, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {ds_dir / tag}; resume from an older step-*.pt")
        _rebase(self.scheduler, self.train_cfg)


def build_engine(train_cfg, objective, env, micro, global_batch, lr_lambda):
    """The ``train.engine`` around ``objective``, with AdamW and the schedule ``lr_lambda``."""
    if train_cfg.engine == "deepspeed":
        return DeepSpeedEngine(train_cfg, objective, env, lr_lambda, micro, global_batch)
    return DDPEngine(train_cfg, objective, env, lr_lambda)
