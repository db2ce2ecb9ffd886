"""Where a process computes: the one place that turns a device setting into a torch.device.

``auto | cpu | cuda`` (``train.device``, ``--device`` of explain, report, catalog, judges).
With several processes per node (local ranks), each takes GPU ``local_rank``, unless the
launcher made exactly one GPU visible to each task (psslurm, ``srun --gpu-bind``): then it
is GPU 0 of that task. More local ranks than visible GPUs otherwise would put two ranks on
one GPU (NCCL refuses that), so it is an error that says what to change.
"""

import contextlib
import logging

import torch

from .errors import ConfigError

log = logging.getLogger("galcf_hpc")

DEVICES = ("auto", "cpu", "cuda")
_warned = []  # the fp32 fallback of train.cpu_bf16 has been reported in this process


def resolve_device(name="auto", local_rank=0, option="--device"):
    """``auto | cpu | cuda`` -> the torch.device of this process (``option`` names the
    setting in errors)."""
    if name not in DEVICES:
        raise ConfigError(f"{option}: must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}: cuda requested but no GPU is visible; use auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1:
        # one GPU visible per task: the launcher bound this rank to its GPU (psslurm, srun --gpu-bind)
        return torch.device("cuda", 0)
    if local_rank >= count:
        raise ConfigError(
            f"{option}: local rank {local_rank} needs GPU {local_rank}, but only {count} GPU(s) are visible "
            "to this process; start at most one rank per visible GPU (e.g. --ntasks-per-node equal to "
            "--gres=gpu:N), or do not restrict CUDA_VISIBLE_DEVICES to fewer GPUs than ranks"
        )
    return torch.device("cuda", local_rank)


def use_device(device, benchmark=True):
    """Make ``device`` the current GPU of this process (where loaders, DeepSpeed and new
    tensors without an index go) and let cuDNN time its convolution algorithms once per
    input shape and keep the fastest (``benchmark``: for fixed batch shapes; off where results
    must be reproducible, ``run.deterministic``). Nothing happens on the CPU."""
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = bool(benchmark)


def cpu_has_native_bf16():
    """Whether this CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16, as oneDNN uses
    them): only there is bf16 autocast faster than fp32. Elsewhere bf16 is emulated and slower."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return False
    found = capabilities()
    return bool(found.get("amx_bf16") or found.get("avx512_bf16"))


def training_autocast(device, train_cfg):
    """The autocast context of a training step: bf16 on a GPU (``train.bf16``), bf16 on a CPU
    with native bf16 (``train.cpu_bf16``; on another CPU fp32, with a warning), else
    none. The model keeps its flow, class means and latent losses in fp32 either way."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16) if train_cfg.bf16 else contextlib.nullcontext()
    if not train_cfg.cpu_bf16:
        return contextlib.nullcontext()
    if not cpu_has_native_bf16():
        if not _warned:  # once per process: the catalog job asks for every unit
            _warned.append(True)
            log.warning(
                "train.cpu_bf16: this CPU has neither AMX-BF16 nor AVX512-BF16, where bf16 would be slower than "
                "fp32; training and evaluating in fp32"
            )
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def autocast_precision(context):
    """ "bf16" or "fp32": what an autocast context of :func:`training_autocast` or
    :func:`inference_autocast` runs the model's convolutions in."""
    return "bf16" if isinstance(context, torch.autocast) and context.fast_dtype == torch.bfloat16 else "fp32"


def inference_autocast(device, train_cfg):
    """The autocast of the model's inference passes (validation, explain, report, catalog,
    ``judges check``): the precision it trained at (:func:`training_autocast`), so that its
    accuracy, its counterfactuals and their validity are those of one function wherever they
    are computed. The judges are not under it: they classify in fp32 inside it."""
    return training_autocast(device, train_cfg)


def inference_precision(device, train_cfg):
    """ "bf16" or "fp32": the precision :func:`inference_autocast` runs the model at."""
    return autocast_precision(inference_autocast(device, train_cfg))
