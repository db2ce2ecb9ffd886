"""VGG16 feature extractor for the perceptual loss, defined here (no torchvision).

The module's parameter names are exactly torchvision's ``vgg16`` names for the feature
part (``features.0.weight`` ... ``features.28.bias``), so torchvision's ImageNet file
``vgg16-397923af.pth`` loads as is with ``torch.load(path, weights_only=True)``; its
``classifier.*`` entries are ignored. Getting the file: :mod:`galcf_hpc.model.weights`
(``galcf-hpc weights fetch``). Tests and smoke runs may use fixed-seed random weights,
which :func:`load_vgg16` only builds when asked to and announces loudly.
"""

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, DataError
from .weights import VGG16_FILENAME, cached_vgg16_path, fetch_hint

log = logging.getLogger("galcf_hpc")

DEFAULT_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")

# torchvision's vgg16 "D" configuration: conv output channels per block, max-pool after
# each block. Blocks are numbered 1-5, convs within a block 1-3 (conv1_1 ... conv5_3).
_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

# ImageNet statistics the torchvision weights were trained with (RGB in [0, 1]).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _layer_table():
    """Layer specs in ``features`` order: (name, kind, in_ch, out_ch).

    kind is "conv", "relu" or "pool"; the position in the list is the index in the
    ``features`` Sequential (conv layers land at 0, 2, 5, 7, 10, ..., 28).
    """
    table = []
    in_ch = 3
    for b, block in enumerate(_BLOCKS, start=1):
        for c, out_ch in enumerate(block, start=1):
            table.append((f"conv{b}_{c}", "conv", in_ch, out_ch))
            table.append((f"relu{b}_{c}", "relu", out_ch, out_ch))
            in_ch = out_ch
        table.append((f"pool{b}", "pool", in_ch, in_ch))
    return table


_LAYERS = _layer_table()
LAYER_INDEX = {name: i for i, (name, _, _, _) in enumerate(_LAYERS)}


def vgg16_feature_shapes():
    """{state-dict key: shape} of torchvision's full ``vgg16`` feature part."""
    shapes = {}
    for i, (_, kind, in_ch, out_ch) in enumerate(_LAYERS):
        if kind == "conv":
            shapes[f"features.{i}.weight"] = (out_ch, in_ch, 3, 3)
            shapes[f"features.{i}.bias"] = (out_ch,)
    return shapes


class VGG16Features(nn.Module):
    """VGG16 ``features`` truncated after the deepest requested layer.

    ``layers`` are names like ``relu1_2``, ``conv3_1`` or ``pool4``. :meth:`forward` takes
    RGB images in [0, 1] ``[B, 3, H, W]``, normalises them with the ImageNet mean/std and
    returns the requested activations in the order given. A fresh instance holds
    fixed-seed random weights (seed 0); use :func:`load_vgg16` to get ImageNet weights.
    """

    def __init__(self, layers=DEFAULT_LAYERS):
        super().__init__()
        if isinstance(layers, str):
            layers = (layers,)
        layers = tuple(layers)
        if not layers:
            raise ValueError("VGG16Features needs at least one layer name")
        unknown = [name for name in layers if name not in LAYER_INDEX]
        if unknown:
            raise ValueError(f"unknown VGG16 layer(s) {unknown}; valid names: {', '.join(LAYER_INDEX)}")
        self.layers = layers
        self._indices = tuple(LAYER_INDEX[name] for name in layers)
        depth = max(self._indices) + 1
        modules = []
        for _, kind, in_ch, out_ch in _LAYERS[:depth]:
            if kind == "conv":
                # skip_init: no draw from the global RNG; init_random() below fills it.
                modules.append(nn.utils.skip_init(nn.Conv2d, in_ch, out_ch, kernel_size=3, padding=1))
            elif kind == "relu":
                # Not in-place: a requested conv output must survive the following ReLU.
                modules.append(nn.ReLU(inplace=False))
            else:
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*modules)
        # Non-persistent: the state dict holds exactly torchvision's feature keys.
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # Deterministic placeholder weights (seed 0) until real ones are loaded.
        self.init_random(0)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG16Features expects [B, 3, H, W] RGB images, got {tuple(x.shape)}")
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        wanted = {idx: None for idx in self._indices}
        last = max(self._indices)
        for i, module in enumerate(self.features):
            h = module(h)
            if i in wanted:
                wanted[i] = h
            if i == last:
                break
        return [wanted[idx] for idx in self._indices]

    def freeze(self):
        """Switch to eval mode and stop gradients to the parameters; returns self."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def init_random(self, seed=0):
        """Fixed-seed Kaiming-normal weights (fan_out, ReLU) and zero biases."""
        gen = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for m in self.features:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=gen)
                    nn.init.zeros_(m.bias)
        return self


def _read_state_dict(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, truncated files, not a torch file
        raise CheckpointError(
            f"cannot read VGG16 weights from {path}: {type(exc).__name__}: {exc}. The file "
            f"may be truncated or not a torch state dict; fetch it again: {fetch_hint(path)}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(
            f"{path} is not a VGG16 state dict (expected a mapping of parameter names to "
            f"tensors such as torchvision's {VGG16_FILENAME})"
        )
    return obj


def _check_feature_keys(path, state, model):
    """Raise CheckpointError naming the keys that do not fit torchvision's vgg16."""
    full = vgg16_feature_shapes()
    needed = model.state_dict()
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    missing = sorted((k for k in needed if k not in features), key=_key_order)
    unexpected = sorted((k for k in features if k not in full), key=_key_order)
    wrong = [
        f"{k}: file {tuple(v.shape)}, expected {full[k]}"
        for k, v in sorted(features.items(), key=lambda kv: _key_order(kv[0]))
        if k in full and tuple(v.shape) != full[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append("wrong shapes [" + "; ".join(wrong) + "]")
    if problems:
        raise CheckpointError(
            f"{path} does not hold torchvision vgg16 feature weights: {', '.join(problems)}. "
            f"Use torchvision's ImageNet file {VGG16_FILENAME} (plain VGG16, not vgg16_bn): "
            f"{fetch_hint(path)}"
        )


def _key_order(key):
    parts = key.split(".")
    return (parts[0], int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, key)


def load_vgg16(weights_path, layers=DEFAULT_LAYERS, allow_random=False, seed=0):
    """Build a frozen :class:`VGG16Features` (eval mode, no gradients to its weights).

    ``weights_path``: torchvision's ``vgg16-397923af.pth`` (or any state dict with its
    feature keys). ``None``: fixed-seed random weights when ``allow_random`` is true (tests,
    smoke runs; logged as a loud warning), else the file in the torch hub cache
    (``galcf-hpc weights fetch``) if it is there, else an error that says how to get it.
    """
    model = VGG16Features(layers)
    if weights_path is None and allow_random:
        model.init_random(seed)
        log.warning(
            "!!! VGG16 weights are RANDOM (seed %d): perceptual-loss features are NOT ImageNet "
            "features. Fine for tests and smoke runs only; set model.vgg_weights to %s for "
            "real training. !!!",
            seed,
            VGG16_FILENAME,
        )
        return model.freeze()
    if weights_path is None:
        cached = cached_vgg16_path()
        if not cached.is_file():
            raise DataError(
                "no VGG16 weights configured for the perceptual loss and none in the torch hub "
                f"cache ({cached}): run `galcf-hpc weights fetch` on a machine with internet "
                f"(it fills that cache; copy the file here if this machine has none), or set "
                f"model.vgg_weights to the path of torchvision's ImageNet file {VGG16_FILENAME}. "
                "Random VGG16 weights are only for tests and smoke runs: allow them explicitly "
                "with model.vgg_random: true."
            )
        log.info("model.vgg_weights not set: using %s from the torch hub cache", cached)
        weights_path = cached

    path = Path(os.fspath(weights_path)).expanduser()
    if not path.is_file():
        raise DataError(f"VGG16 weights file {path} not found: {fetch_hint(path)}")
    state = _read_state_dict(path)
    _check_feature_keys(path, state, model)
    needed = model.state_dict()
    model.load_state_dict({k: state[k] for k in needed}, strict=True)
    log.info("loaded VGG16 feature weights from %s (layers %s)", path, ", ".join(model.layers))
    return model.freeze()
