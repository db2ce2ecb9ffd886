"""The patch discriminator of the adversarial terms (``loss.rec_adversarial`` on the
reconstructions x~, ``loss.cf_adversarial`` on the decoded counterfactuals x_cf).

A decoder trained with a pixel MSE and SSIM draws the mean of what a latent code could be:
spiral arms, a bar or a second nucleus are blurred into a smooth disc, and a counterfactual
cannot show a structure the decoder does not draw. A discriminator that scores every patch of
an image as "a real galaxy" or "decoded" penalises exactly that blur. It learns from the
training galaxies against detached decoder outputs (a hinge loss on every patch); its frozen
verdict trains the decoder. It sees no class, so it asks for realistic texture, not for a
class, and it is something the model is *trained against*, never a judge
(``galcf_hpc.judges`` are separate networks and training runs).
"""

import math

from torch import nn


class PatchDiscriminator(nn.Module):
    """Strided 4x4 convolutions down to 8x8 patches (one stage per halving: two at 32 px,
    five at 256 px; receptive field 18 px at 32 px, 38 px at 64 px), then a 3x3 convolution to
    one logit per patch. No normalisation in the first stage, GroupNorm after it (the scores do
    not depend on the per-rank batch), LeakyReLU."""

    def __init__(self, image_size, width=32):
        super().__init__()
        stages = max(1, int(math.log2(image_size)) - 3)
        layers, c_in, c = [], 3, width
        for i in range(stages):
            layers.append(nn.Conv2d(c_in, c, 4, stride=2, padding=1))
            if i:
                layers.append(nn.GroupNorm(min(8, c), c))
            layers.append(nn.LeakyReLU(0.2))
            c_in, c = c, min(2 * c, 256)
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        """Patch logits [B, 1, h, w] for images [B, 3, H, W] in [0, 1] (> 0: a real galaxy)."""
        return self.net(x - 0.5)
