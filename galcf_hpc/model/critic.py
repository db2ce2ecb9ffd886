"""The luminance critic: a small CNN, part of the training objective, that classifies
galaxies from their luminance (the mean of the bands) alone.

It learns from real galaxies only (``critic_real``); on decoded counterfactuals its weights
are frozen and its verdict trains the decoder (``loss.cf_critic``). A counterfactual that
only recolours a galaxy cannot convince it: the decoder has to change the brightness
structure (shape, arms, bulge) to reach the target class. With ``loss.cf_realism`` it has one
more class, "decoded counterfactual", learnt from detached counterfactuals against the
galaxies and their reconstructions (the decoder's own image domain, so blur alone does not
give a counterfactual away): the decoder then has to draw something it cannot tell from a
galaxy of the target class (an auxiliary-classifier GAN). It is something the model is
*trained against*, so it is never used to judge the model (``galcf_hpc.judges`` are separate
networks, seeds and training runs).
"""

from torch import nn


def _stage(c_in, c_out):
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.SiLU(),
        nn.AvgPool2d(2),
    ]


class _Critic(nn.Module):
    """What every critic shares: its input (the band mean, or the bands for a colour critic),
    a feature extractor ending in ``c_out`` channels, global average pooling and a linear head
    (with ``realism`` one more output: "a decoded counterfactual, not a galaxy")."""

    def __init__(self, features, c_out, num_classes, realism, colour):
        super().__init__()
        self.colour = colour  # a colour critic (loss.cf_critic_colour) sees the bands themselves
        self.features = features
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_out, num_classes + realism))

    def forward(self, x, stages=False):
        """Class logits [B, C] for images [B, 3, H, W] in [0, 1] (colour is discarded unless
        this is a colour critic); with ``stages`` instead the feature maps after each stage
        that halves the resolution, finest first (``loss.rec_features``)."""
        h = (x if self.colour else x.mean(dim=1, keepdim=True)) - 0.5
        if not stages:
            return self.head(self.features(h))
        found = []
        for layer in self.features:
            h = layer(h)
            if isinstance(layer, (nn.AvgPool2d, _ResidualStage)):
                found.append(h)
        return found


class LuminanceCritic(_Critic):
    """Plain stages (two convolutions, average pooling) down to 4 pixels."""

    def __init__(self, image_size, num_classes, width=16, realism=False, colour=False):
        layers, c_in, size = [], 3 if colour else 1, image_size
        c = width
        while size > 4:
            layers += _stage(c_in, c)
            c_in, c, size = c, min(2 * c, 128), size // 2
        super().__init__(nn.Sequential(*layers), c_in, num_classes, realism, colour)


class _ResidualStage(nn.Module):
    """Pre-activation residual stage that halves the resolution with a strided convolution;
    the shortcut is a strided 1x1 convolution."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(min(8, c_in), c_in),
            nn.SiLU(),
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
            nn.GroupNorm(min(8, c_out), c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=2)

    def forward(self, x):
        return self.skip(x) + self.body(x)


class ResidualCritic(_Critic):
    """The same task and interface as :class:`LuminanceCritic`, another architecture family: a
    stem convolution, then strided pre-activation residual stages down to 4 pixels, a
    normalised, activated global average and a linear head."""

    def __init__(self, image_size, num_classes, width=16, realism=False, colour=False):
        c, size = width, image_size
        layers = [nn.Conv2d(3 if colour else 1, c, 3, padding=1)]
        while size > 4:
            layers.append(_ResidualStage(c, min(2 * c, 128)))
            c, size = min(2 * c, 128), size // 2
        layers += [nn.GroupNorm(min(8, c), c), nn.SiLU()]
        super().__init__(nn.Sequential(*layers), c, num_classes, realism, colour)
