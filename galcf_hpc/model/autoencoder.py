"""Convolutional encoder E: x -> z and decoder D: z -> x~ (paper Sec. 2).

Each stage halves (encoder) or doubles (decoder) the resolution with one residual block.
GroupNorm rather than BatchNorm: statistics do not depend on the per-rank batch, so
single-process and distributed runs compute the same function.
"""

import torch
from torch import nn


def _norm(channels):
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, resample=None):
        super().__init__()
        self.resample = resample  # None | "down" | "up"
        self.body = nn.Sequential(
            _norm(c_in),
            nn.SiLU(),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        if self.resample == "up":
            x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        out = self.body(x) + self.skip(x)
        if self.resample == "down":
            out = nn.functional.avg_pool2d(out, 2)
        return out


class Encoder(nn.Module):
    def __init__(self, image_size, channels, z_dim):
        super().__init__()
        self.stem = nn.Conv2d(3, channels[0], 3, padding=1)
        blocks, c_prev = [], channels[0]
        for c in channels:
            blocks.append(ResBlock(c_prev, c, "down"))
            c_prev = c
        self.blocks = nn.Sequential(*blocks)
        self.final = image_size // 2 ** len(channels)
        self.head = nn.Sequential(_norm(c_prev), nn.SiLU(), nn.Flatten(), nn.Linear(c_prev * self.final**2, z_dim))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class Decoder(nn.Module):
    """``depth`` residual blocks per stage: the first doubles the resolution, the others
    refine at it (more capacity for fine structure: arms, bars, a second nucleus)."""

    def __init__(self, image_size, channels, z_dim, depth=1):
        super().__init__()
        rev = list(reversed(channels))
        self.final = image_size // 2 ** len(channels)
        self.c0 = rev[0]
        self.fc = nn.Linear(z_dim, rev[0] * self.final**2)
        blocks, c_prev = [], rev[0]
        for c in rev:
            blocks.append(ResBlock(c_prev, c, "up"))
            blocks += [ResBlock(c, c) for _ in range(depth - 1)]
            c_prev = c
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Sequential(_norm(c_prev), nn.SiLU(), nn.Conv2d(c_prev, 3, 3, padding=1))

    def forward(self, z):
        h = self.fc(z).view(z.shape[0], self.c0, self.final, self.final)
        # sigmoid keeps x~ in [0, 1], the range of the inputs and of VGG's normalisation
        return torch.sigmoid(self.out(self.blocks(h)))
