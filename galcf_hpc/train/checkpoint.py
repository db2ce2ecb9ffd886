"""Checkpoints as plain dicts of tensors and primitives, loadable with
``torch.load(weights_only=True)``; written atomically; the newest complete one is found by
name. A checkpoint carries the resolved config, so a run can be explained or resumed from
its directory alone."""

import re
from pathlib import Path

import torch

from .. import __version__
from ..errors import CheckpointError
from ..fileio import atomic_path, file_sha256

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(run_dir):
    return Path(run_dir) / "checkpoints"


def rng_state(device):
    """This rank's random state: the CPU generator and, on a GPU, that GPU's generator only
    (other visible GPUs belong to other ranks; touching them would create contexts there)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(run_dir, step, payload, keep=2):
    """Write ``payload`` (+ version) as checkpoints/step-XXXXXXXX.pt, keep the newest ``keep``."""
    directory = checkpoint_dir(run_dir)
    path = directory / f"step-{step:08d}.pt"
    try:
        with atomic_path(path) as tmp:
            torch.save({**payload, "step": step, "version": __version__}, tmp)
    except (OSError, RuntimeError) as exc:  # a full disk or quota: torch reports it as either
        previous = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"could not write checkpoint {path} ({str(exc).splitlines()[0][:200]}); nothing was replaced: "
            f"the newest complete checkpoint is {previous or 'none'}. Free space (or raise the quota), then "
            "rerun with --resume"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir):
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir):
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train first or pass an existing file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "it is truncated, corrupt or not a galcf-hpc checkpoint: use an older one from the same "
            "directory or retrain"
        ) from None


def check_compatible(model, state, path):
    """Raise CheckpointError naming the mismatching parameters if ``state`` does not fit ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + ", ".join(f"{k} {got[k]} vs model {expected[k]}" for k in wrong[:6]))
        if missing:
            parts.append("missing: " + ", ".join(missing[:6]))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:6]))
        raise CheckpointError(
            f"checkpoint {path} was made for another model configuration ({'; '.join(parts)}); "
            "use the config stored in that checkpoint's run directory, or a matching checkpoint"
        )


def deepspeed_states(path, state, allowed_globals=()):
    """The DeepSpeed directory that step file ``path`` refers to, checked before DeepSpeed
    unpickles anything in it (it loads with ``weights_only=False``, which runs code stored in
    a crafted file). The tag must be the one galcf-hpc writes for this step (no path of its
    own choosing), the directory and its files plain (no symbolic links out of the run), the
    files exactly those whose sha256 the step file recorded at save time (``deepspeed_files``;
    step files written before it existed skip this), and every file must load with
    ``weights_only=True``: tensors, containers and primitives,
    plus ``allowed_globals`` (DeepSpeed's own data classes). Loading uses mmap, so the check
    reads the pickle, not the tensors' bytes."""
    path = Path(path)
    m = _NAME.match(path.name)
    expected = f"step-{m.group(1)}" if m else None
    tag = state.get("deepspeed_tag")
    if expected is None or tag != expected:
        raise CheckpointError(
            f"{path} names DeepSpeed tag {tag!r}, but galcf-hpc writes {expected!r} for this file; "
            "refusing to load it (not written by galcf-hpc, or altered): resume from another step-*.pt "
            "or start a new run.out_dir"
        )
    root = checkpoint_dir(path.parent.parent) / "deepspeed"
    directory = root / tag
    if directory.is_symlink() or not directory.is_dir():
        raise CheckpointError(
            f"{path} refers to DeepSpeed checkpoint {directory}, which is missing or a link; "
            "resume from an older step-*.pt or start a new run.out_dir"
        )
    recorded = state.get("deepspeed_files")  # sha256 per file, recorded when the step was saved
    if recorded is not None:
        present = sorted(p.name for p in directory.iterdir())
        if present != sorted(recorded):
            raise CheckpointError(
                f"{directory} holds {present}, but {path} recorded {sorted(recorded)}; refusing to load "
                "files galcf-hpc did not write: resume from another step-*.pt or start a new run.out_dir"
            )
    for item in sorted(directory.iterdir()):
        if item.is_symlink() or not item.is_file():
            raise CheckpointError(f"{item} is a link or not a plain file; a DeepSpeed checkpoint holds plain files")
        if recorded is not None and file_sha256(item) != recorded[item.name]:
            raise CheckpointError(
                f"{item} changed since {path} was saved (sha256 differs); refusing to load it: resume from "
                "another step-*.pt or start a new run.out_dir"
            )
        if item.suffix != ".pt":
            continue
        try:
            with torch.serialization.safe_globals(list(allowed_globals)):
                torch.load(item, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            why = f"it holds {found.group(1)}" if found else str(exc).strip().splitlines()[-1][:200]
            raise CheckpointError(
                f"{item} is not plain checkpoint data ({why}); refusing to let DeepSpeed unpickle it: "
                "resume from another step-*.pt or start a new run.out_dir"
            ) from None
    return root
