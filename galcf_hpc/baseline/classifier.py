"""The baseline network: conv blocks (conv-GroupNorm-ReLU x 2, max-pool), global average
pooling, a linear layer. Shares no code or weights with :mod:`galcf_hpc.model`.

GroupNorm instead of BatchNorm: predictions of one galaxy do not depend on the rest of
its batch, so the report's numbers can be recomputed galaxy by galaxy."""

from pathlib import Path

import torch
from torch import nn

from ..data.classes import NUM_CLASSES
from ..errors import CheckpointError

FORMAT = "galcf-hpc-baseline/1"


def _groups(channels):
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class BaselineCNN(nn.Module):
    def __init__(self, channels=(16, 32, 64), num_classes=NUM_CLASSES, dropout=0.1):
        super().__init__()
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels!r}")
        self.channels = [int(c) for c in channels]
        self.num_classes = int(num_classes)
        blocks, c_in = [], 3
        for c in self.channels:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.GroupNorm(_groups(c), c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(_groups(c), c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(c_in, self.num_classes))

    def forward(self, x):
        """Logits [B, num_classes] for images [B, 3, H, W] in [0, 1]."""
        return self.head(self.features(x - 0.5))


@torch.no_grad()
def predict(model, images, batch_size=256):
    """Predicted classes (int64, on the images' device) of ``images`` [B, 3, H, W]."""
    model.eval()
    out = [model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=images.device)


def save_baseline(path, model, extra):
    state = {"format": FORMAT, "channels": model.channels, "num_classes": model.num_classes,
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_baseline(path, device="cpu"):
    """(model in eval mode on ``device``, the saved dict) from a baseline ``model.pt``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no baseline classifier at {path}; train it with "
                              "`galcf-hpc baseline train --config RUN/config.yaml`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{path} is not a readable baseline checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a galcf-hpc baseline checkpoint (format {FORMAT!r} expected)")
    model = BaselineCNN(state["channels"], state["num_classes"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
