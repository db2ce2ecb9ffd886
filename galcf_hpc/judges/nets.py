"""The judges' networks: two architecture families that share no code or weights with
:mod:`galcf_hpc.model`, each with colour (g, r, z) or luminance-only input.

- ``PlainCNN``: conv-GroupNorm-ReLU pairs and max-pooling, global average pooling, linear.
- ``ResNet``: a small pre-activation ResNet (BatchNorm, strided 3x3 convolutions, identity
  or 1x1 shortcuts), global average pooling, linear.

``input="luminance"`` replaces the bands by their mean before anything else, so a judge
of that kind cannot see colour at all: a counterfactual that only recolours a galaxy
cannot convince it. Every judge maps images [B, 3, H, W] in [0, 1] to class logits.
"""

from pathlib import Path

import torch
from torch import nn

from ..data.classes import NUM_CLASSES
from ..errors import CheckpointError

FORMAT = "galcf-hpc-judge/1"
INPUTS = ("colour", "luminance")


def _groups(channels):
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class _Judge(nn.Module):
    def __init__(self, input):
        super().__init__()
        if input not in INPUTS:
            raise ValueError(f"judge input must be one of {INPUTS}, got {input!r}")
        self.input = input

    def _prepare(self, x):
        if self.input == "luminance":
            x = x.mean(dim=1, keepdim=True)
        return x - 0.5

    @property
    def in_channels(self):
        return 1 if self.input == "luminance" else 3


class PlainCNN(_Judge):
    family = "plain_cnn"

    @staticmethod
    def memory_format(precision):
        """The layout it trains fastest in at ``precision`` (bf16 or fp32; it computes the same
        function in either): on a CPU its GroupNorm makes a bf16 step channels-last 0.68x as
        fast, an fp32 step 1.29x as fast (benchmarks/judges_layout.py, 32 and 64 px)."""
        return torch.contiguous_format if precision == "bf16" else torch.channels_last

    def __init__(self, channels=(16, 32, 64), num_classes=NUM_CLASSES, input="colour", dropout=0.1):
        super().__init__(input)
        blocks, c_in = [], self.in_channels
        for c in channels:
            blocks += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.GroupNorm(_groups(c), c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.GroupNorm(_groups(c), c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)
        )

    def forward(self, x):
        return self.head(self.features(self._prepare(x)))


class _PreActBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class ResNet(_Judge):
    family = "resnet"

    @staticmethod
    def memory_format(precision):
        """Channels-last at either precision: a training step 1.36-1.51x as fast on a CPU, bf16
        and fp32, 32 and 64 px (benchmarks/judges_layout.py)."""
        return torch.channels_last

    def __init__(self, channels=(16, 32, 64), num_classes=NUM_CLASSES, input="colour", blocks_per_stage=1):
        super().__init__(input)
        self.stem = nn.Conv2d(self.in_channels, channels[0], 3, padding=1, bias=False)
        layers, c_in = [], channels[0]
        for i, c in enumerate(channels):
            for j in range(blocks_per_stage):
                layers.append(_PreActBlock(c_in, c, 2 if (j == 0 and i > 0) else 1))
                c_in = c
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c_in, num_classes),
        )

    def forward(self, x):
        return self.head(self.layers(self.stem(self._prepare(x))))


FAMILIES = {PlainCNN.family: PlainCNN, ResNet.family: ResNet}


def build_judge(family, channels, input, num_classes=NUM_CLASSES, depth=1):
    """A judge network; ``depth`` is the number of residual blocks per stage (ResNet only),
    recorded in the checkpoint so that a saved judge is always rebuilt the same way."""
    if family not in FAMILIES:
        raise ValueError(f"unknown judge family {family!r}; known: {', '.join(FAMILIES)}")
    extra = {"blocks_per_stage": int(depth)} if family == ResNet.family else {}
    return FAMILIES[family](tuple(int(c) for c in channels), num_classes=num_classes, input=input, **extra)


def save_judge(path, model, spec, extra):
    """Plain-tensor checkpoint (loadable with weights_only=True), written atomically."""
    state = {"format": FORMAT, **spec, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_judge(path, device="cpu"):
    """(judge in eval mode on ``device``, the saved dict) from a judge ``model.pt``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no judge at {path}; train the panel with `galcf-hpc judges train --config RUN/config.yaml`"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(
            f"{path} is not a readable judge checkpoint ({type(exc).__name__}: {exc}); "
            "retrain it with `galcf-hpc judges train`"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a galcf-hpc judge checkpoint (format {FORMAT!r} expected)")
    try:
        model = build_judge(
            state["family"], state["channels"], state["input"], state["num_classes"], state.get("depth", 1)
        )
        model.load_state_dict(state["model"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: judge checkpoint does not fit its own description ({exc}); retrain it "
            "with `galcf-hpc judges train`"
        ) from None
    return model.to(device).eval(), state


@torch.no_grad()
def predict(model, images, batch_size=256):
    """Predicted classes (int64, on the images' device) of ``images`` [B, 3, H, W]."""
    model.eval()
    out = [model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=images.device)
