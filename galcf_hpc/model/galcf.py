"""The paper's model: encoder/decoder with z = [z1, z2], a FrEIA flow z1 -> h and a
Gaussian mixture in h with one trainable mean per class."""

import math
from itertools import islice
from typing import NamedTuple

import torch
from torch import nn

from ..config import CRITIC_FAMILIES, VIEW_COUNTS
from ..data.classes import NUM_CLASSES
from .autoencoder import Decoder, Encoder
from .counterfactual import counterfactual_h
from .critic import LuminanceCritic, ResidualCritic
from .discriminator import PatchDiscriminator
from .flow import build_flow, flow_forward, flow_inverse
from .gmm import class_logits, initial_means


class Latents(NamedTuple):
    """Everything one forward pass computes: z = [z1, z2] = E(x), h = F(z1 + noise) with
    log|det J|, and the reconstruction x~ = D(z)."""

    z: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor
    h: torch.Tensor
    logdet: torch.Tensor
    recon: torch.Tensor


class Classification(NamedTuple):
    """Nearest-mean classification of images: predicted class, class logits
    (-1/2 ||h - mu_c||^2 + log w_c), hidden vector h and latent z."""

    pred: torch.Tensor
    logits: torch.Tensor
    h: torch.Tensor
    z: torch.Tensor


# which of the eight symmetries of the square (numbered as in dihedral_view) each view count takes
_VIEW_INDICES = {1: (0,), 2: (0, 1), 4: (0, 2, 4, 6), 8: tuple(range(8))}


def dihedral_view(x, i):
    """Symmetry ``i`` (0-7) of the square applied to images x [..., H, W] (square): a rotation
    by (i // 2) x 90 degrees, then a left-right mirror image if i is odd. Exact: pixels are
    permuted, none is resampled. 0 is x itself."""
    k, mirror = divmod(i, 2)
    r = torch.rot90(x, k, (-2, -1)) if k else x
    return r.flip(-1) if mirror else r


def dihedral_views(x, n):
    """The first ``n`` (one of ``VIEW_COUNTS``) symmetric views of images x, starting with x
    itself: n = 2 adds its mirror image, n = 4 gives the rotations by 0, 90, 180 and 270
    degrees, n = 8 those and their mirror images. A generator: one view at a time."""
    if n not in VIEW_COUNTS:
        raise ValueError(f"number of views must be one of {VIEW_COUNTS}, got {n!r}")
    return (dihedral_view(x, i) for i in _VIEW_INDICES[n])


class GalaxyCF(nn.Module):
    def __init__(
        self,
        image_size,
        channels,
        z_dim,
        z1_dim,
        flow_blocks,
        flow_hidden,
        flow_clamp,
        mean_distance,
        num_classes=NUM_CLASSES,
        seed=0,
        z2_critic=False,
        luminance_critic=False,
        realism=False,
        colour_critic=False,
        critic_family="plain",
        decoder_depth=1,
        discriminator=False,
        classify_views=1,
    ):
        super().__init__()
        self.z1_dim = z1_dim
        if classify_views not in VIEW_COUNTS:
            raise ValueError(f"classify_views must be one of {VIEW_COUNTS}, got {classify_views!r}")
        self.classify_views = classify_views
        self.encoder = Encoder(image_size, channels, z_dim)
        self.decoder = Decoder(image_size, channels, z_dim, decoder_depth)
        self.flow = build_flow(z1_dim, flow_blocks, flow_hidden, flow_clamp, seed=seed)
        self.means = nn.Parameter(initial_means(num_classes, z1_dim, mean_distance, seed=seed))
        # equal class weights w_c: the classifier is not biased towards frequent classes
        self.register_buffer("log_weights", torch.full((num_classes,), -math.log(num_classes)))
        # class critic on z2, trained through a gradient reversal (loss.z2_adversary): the
        # encoder is pushed to keep class information out of z2, so the decoder has to take
        # a galaxy's morphology from z1. Part of the training objective, never a judge.
        self.z2_critic = (
            nn.Sequential(
                nn.Linear(z_dim - z1_dim, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, num_classes)
            )
            if z2_critic
            else None
        )
        # classifier of luminance alone (loss.cf_critic), trained on real galaxies; its frozen
        # verdict on counterfactuals makes the decoder change structure, not colour
        # loss.cf_critic_family: "residual" builds them as strided residual networks instead,
        # "both" adds residual ones (critic_residual, colour_critic_residual) to the plain ones
        if critic_family not in CRITIC_FAMILIES:
            raise ValueError(f"critic_family must be one of {CRITIC_FAMILIES}, got {critic_family!r}")
        first = ResidualCritic if critic_family == "residual" else LuminanceCritic
        both = critic_family == "both"
        self.critic = first(image_size, num_classes, realism=realism) if luminance_critic else None
        self.colour_critic = first(image_size, num_classes, width=24, colour=True) if colour_critic else None
        self.critic_residual = ResidualCritic(image_size, num_classes) if luminance_critic and both else None
        self.colour_critic_residual = (
            ResidualCritic(image_size, num_classes, width=24, colour=True) if colour_critic and both else None
        )
        # patch discriminator, real galaxies against decoded images (loss.rec_adversarial,
        # loss.cf_adversarial): trained against, like the critics, never a judge
        self.discriminator = PatchDiscriminator(image_size) if discriminator else None

    @classmethod
    def from_config(cls, cfg):
        m = cfg.model
        return cls(
            cfg.data.image_size,
            m.channels,
            m.z_dim,
            m.z1_dim,
            m.flow_blocks,
            m.flow_hidden,
            m.flow_clamp,
            m.mean_distance,
            seed=cfg.run.seed,
            z2_critic=cfg.loss.z2_adversary > 0,
            luminance_critic=cfg.loss.cf_critic > 0,
            realism=cfg.loss.cf_realism,
            colour_critic=cfg.loss.cf_critic_colour > 0,
            critic_family=cfg.loss.cf_critic_family,
            decoder_depth=m.decoder_depth,
            discriminator=cfg.loss.rec_adversarial > 0 or cfg.loss.cf_adversarial > 0,
            classify_views=m.classify_views,
        )

    def critics(self, loss_cfg):
        """(name, critic, weight) of every image critic of the objective: the luminance ones
        weigh ``loss.cf_critic``, the colour ones ``loss.cf_critic_colour``."""
        found = []
        for name, weight in (
            ("critic", loss_cfg.cf_critic),
            ("colour_critic", loss_cfg.cf_critic_colour),
            ("critic_residual", loss_cfg.cf_critic),
            ("colour_critic_residual", loss_cfg.cf_critic_colour),
        ):
            module = getattr(self, name)
            if module is not None and weight > 0:
                found.append((name, module, weight))
        return found

    def forward(self, x, z1_noise=0.0):
        """E, F and D on images x: returns :class:`Latents`. ``z1_noise`` (training) adds
        Gaussian noise of that standard deviation to z1 before the flow (IB-INN)."""
        z = self.encoder(x)
        z1, z2 = self.split(z)
        noisy = z1 + z1_noise * torch.randn_like(z1) if z1_noise else z1
        with torch.autocast(x.device.type, enabled=False):  # bf16 only for the convolutions
            h, logdet = self.hidden(noisy.float())
        return Latents(z, z1, z2, h, logdet, self.decoder(z))

    def split(self, z):
        return z[:, : self.z1_dim], z[:, self.z1_dim :]

    def hidden(self, z1):
        return flow_forward(self.flow, z1)

    def logits(self, h):
        return class_logits(h, self.means, self.log_weights)

    @torch.no_grad()
    def classify(self, x, views=None):
        """Nearest class mean in h for images x (no decoding): :class:`Classification`.

        ``views`` (default ``self.classify_views``, from ``model.classify_views``): with more
        than one, the class probabilities of that many symmetric views of each image
        (:func:`dihedral_views`) are averaged, and ``logits`` are the log of the mean; pred
        is their argmax. ``h`` and ``z`` are always those of the image as given: a
        counterfactual is built from them. The views are encoded one after the other, so
        the memory is that of one view. The flow and the class means always run in fp32,
        also under bf16 autocast."""
        views = self.classify_views if views is None else views
        z, h, logits = self._read(x)
        if views > 1:
            probs = logits.softmax(1)
            for view in islice(dihedral_views(x, views), 1, None):
                probs = probs + self._read(view)[2].softmax(1)
            logits = (probs / views).clamp_min(1e-30).log()
        return Classification(logits.argmax(1), logits, h, z)

    def _read(self, x):
        """z, h and class logits of images x as given (flow and means in fp32)."""
        z = self.encoder(x)
        with torch.autocast(x.device.type, enabled=False):
            h, _ = self.hidden(self.split(z)[0].float())
            return z, h, self.logits(h)

    @torch.no_grad()
    def counterfactual_latent(self, z, h, pred, target, margin, placement="boundary"):
        """Latent of the counterfactual of z (hidden h, predicted class pred) towards
        ``target``: move h into the target class (``placement``, model/counterfactual.py),
        invert the flow to z1_cf, keep z2. Returns (z_cf, h_cf); no gradient flows through it."""
        with torch.autocast(z.device.type, enabled=False):
            h_cf = counterfactual_h(
                h.float(), pred, target, self.means.float(), self.log_weights, margin, mode=placement
            )
            z1_cf = flow_inverse(self.flow, h_cf)
        return torch.cat([z1_cf.to(z.dtype), self.split(z)[1]], dim=1), h_cf

    @torch.no_grad()
    def counterfactual(self, z, h, pred, target, margin, placement="boundary"):
        """Decoded counterfactual image x_cf = D([z1_cf, z2]) and its h_cf."""
        z_cf, h_cf = self.counterfactual_latent(z, h, pred, target, margin, placement)
        return self.decoder(z_cf), h_cf
