"""Counterfactual images from a catalog: ``galcf-hpc catalog render``.

A catalog stores per galaxy its latent z, hidden vector h and predicted class, so every
counterfactual image can be computed again from the catalog and its checkpoint instead of
being stored (``catalog run --images none``). The catalog job and this module share the
inference set-up (:func:`inference_model`, :func:`inference_context`) and decode in batches
of exactly ``decode_batch`` latents (an attribute of the catalog; see
``model.evaluation.padded_rows``), so a rendered image equals, byte for byte, the one a
``--images full`` run of the same checkpoint on the same kind of device stores.
"""

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.classes import CLASS_NAMES
from ..device import inference_autocast, inference_precision
from ..errors import DataError, UsageError
from ..fileio import file_sha256
from ..model.evaluation import counterfactual_images
from . import store

log = logging.getLogger("galcf_hpc")


def inference_model(module, device):
    """A model or judge as the catalog runs it: on ``device``, in eval mode, convolution
    weights channels-last (faster convolutions on CPUs and GPUs alike)."""
    return module.to(device).eval().to(memory_format=torch.channels_last)


def inference_context(device, train_cfg):
    """Inference mode, and the autocast of the precision the model trained at
    (:func:`galcf_hpc.device.inference_autocast`: bf16 for the convolutions on a GPU with
    ``train.bf16`` and on a CPU with native bf16 and ``train.cpu_bf16``); the model keeps
    flow, class means and the counterfactual geometry in fp32 itself, the judges run in fp32."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(inference_autocast(device, train_cfg))
    return stack


def to_uint8(images):
    """Images in [0, 1] (any float dtype) -> uint8 x255, rounded."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def thumbnails(images, size):
    """uint8 thumbnails of float images ``[..., 3, R, R]`` at ``size`` px: the mean over each
    output pixel's footprint (antialiased), then rounded."""
    shape = images.shape
    flat = images.float().clamp(0, 1).reshape(-1, *shape[-3:])
    small = F.interpolate(flat, size=(size, size), mode="area")
    return to_uint8(small).reshape(*shape[:-2], size, size)


def _row_of(keys, key, path):
    rows = np.flatnonzero(keys == key.encode())
    if len(rows) == 0:
        raise UsageError(f"{path}: no galaxy with key {key!r}; `--index I` takes its row number instead")
    return int(rows[0])


def render(catalog_dir, key=None, index=None, targets=None, device="cpu", checkpoint=None):
    """The counterfactuals of one galaxy of a catalog, recomputed from its z, h, predicted
    class and the catalog's checkpoint (sha256 checked). ``key`` or ``index`` (row) names
    the galaxy, ``targets`` a subset of the catalog's targets (default: all). Returns
    {"key", "index", "pred", "targets", "images" (uint8 [T, 3, R, R])}."""
    from ..explain.run import load_run

    if (key is None) == (index is None):
        raise UsageError("name the galaxy with exactly one of --key and --index")
    path = Path(catalog_dir) / store.CATALOG
    attrs = store.read_attrs(path)
    import h5py

    with h5py.File(path, "r") as f:
        problems = store.check_sources(f, path.parent)
        if problems:
            raise DataError(f"{path}: not rendered: {problems[0]}; {store.repair_hint(path.parent)}")
        n = f["key"].shape[0]
        row = _row_of(f["key"][()], key, path) if index is None else int(index)
        if not 0 <= row < n:
            raise UsageError(f"--index {index} is outside the catalog's rows 0-{n - 1}")
        z, h, pred, found = f["z"][row], f["h"][row], int(f["pred"][row]), f["key"][row].decode()
    stored = [int(t) for t in attrs["targets"]]
    chosen = stored if targets is None else list(targets)
    outside = [CLASS_NAMES[t] for t in chosen if t not in stored]
    if outside:
        raise UsageError(f"target(s) {', '.join(outside)} are not targets of this catalog ({path})")
    ckpt = Path(checkpoint or attrs["checkpoint"])
    if not ckpt.is_file():
        raise DataError(f"checkpoint {ckpt} of {path} does not exist; pass its new place with --checkpoint")
    if file_sha256(ckpt) != attrs["checkpoint_sha256"]:
        raise DataError(
            f"checkpoint {ckpt} is not the one {path} was made with (sha256 differs); the images would be "
            "another model's: pass the catalog's own checkpoint with --checkpoint"
        )
    dev = torch.device(device)
    model, cfg, _ = load_run(None, ckpt, "cpu")
    model = inference_model(model, dev)
    precision = inference_precision(dev, cfg.train)
    if "precision" in attrs and str(attrs["precision"]) != precision:
        log.warning(
            "%s was computed in %s, this render runs the model in %s on %s: its images can differ from the "
            "catalog's by rounding; render on the kind of device the catalog ran on for the same bytes",
            path,
            attrs["precision"],
            precision,
            dev,
        )
    with inference_context(dev, cfg.train):
        images = counterfactual_images(
            model,
            torch.as_tensor(z, device=dev)[None],
            torch.as_tensor(h, device=dev)[None],
            torch.as_tensor([pred], device=dev),
            chosen,
            float(attrs["margin"]),
            str(attrs["placement"]),
            int(attrs["decode_batch"]),
        )
    return {"key": found, "index": row, "pred": pred, "targets": chosen, "images": to_uint8(images[0]).cpu().numpy()}


def write_strip(images, out_path):
    """A PNG of images ``[T, 3, R, R]`` (uint8) side by side, 2 px apart, written atomically."""
    from PIL import Image

    from ..fileio import atomic_path

    t, _, r, _ = images.shape
    strip = np.full((r, t * r + 2 * (t - 1), 3), 255, np.uint8)
    for i, img in enumerate(images):
        strip[:, i * (r + 2) : i * (r + 2) + r] = img.transpose(1, 2, 0)
    with atomic_path(Path(out_path)) as tmp:
        Image.fromarray(strip).save(tmp, format="PNG")
