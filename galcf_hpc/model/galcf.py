"""The paper's model: encoder/decoder with z = [z1, z2], a FrEIA flow z1 -> h and a
Gaussian mixture in h with one trainable mean per class."""

import math

import torch
from torch import nn

from ..data.classes import NUM_CLASSES
from .counterfactual import counterfactual_h
from .autoencoder import Decoder, Encoder
from .flow import build_flow, flow_forward, flow_inverse
from .gmm import class_logits, initial_means


class GalaxyCF(nn.Module):
    def __init__(self, image_size, channels, z_dim, z1_dim, flow_blocks, flow_hidden, flow_clamp,
                 mean_distance, num_classes=NUM_CLASSES, seed=0):
        super().__init__()
        self.z1_dim = z1_dim
        self.encoder = Encoder(image_size, channels, z_dim)
        self.decoder = Decoder(image_size, channels, z_dim)
        self.flow = build_flow(z1_dim, flow_blocks, flow_hidden, flow_clamp, seed=seed)
        self.means = nn.Parameter(initial_means(num_classes, z1_dim, mean_distance, seed=seed))
        # equal class weights w_c: the classifier is not biased towards frequent classes
        self.register_buffer("log_weights", torch.full((num_classes,), -math.log(num_classes)))

    @classmethod
    def from_config(cls, cfg):
        m = cfg.model
        return cls(cfg.data.image_size, m.channels, m.z_dim, m.z1_dim, m.flow_blocks, m.flow_hidden,
                   m.flow_clamp, m.mean_distance, seed=cfg.run.seed)

    def split(self, z):
        return z[:, : self.z1_dim], z[:, self.z1_dim:]

    def hidden(self, z1):
        return flow_forward(self.flow, z1)

    def logits(self, h):
        return class_logits(h, self.means, self.log_weights)

    @torch.no_grad()
    def classify(self, x):
        """Nearest class mean in h for images x: returns (pred, logits, h, z)."""
        z = self.encoder(x)
        h, _ = self.hidden(self.split(z)[0])
        logits = self.logits(h)
        return logits.argmax(1), logits, h, z

    @torch.no_grad()
    def counterfactual_latent(self, z, h, pred, target, margin):
        """Latent of the counterfactual of z (hidden h, predicted class pred) towards
        ``target``: move h past the boundary, invert the flow to z1_cf, keep z2.
        Returns (z_cf, h_cf); no gradient flows through it."""
        h_cf = counterfactual_h(h, pred, target, self.means, self.log_weights, margin)
        z1_cf = flow_inverse(self.flow, h_cf.to(z.dtype))
        return torch.cat([z1_cf, self.split(z)[1]], dim=1), h_cf

    @torch.no_grad()
    def counterfactual(self, z, h, pred, target, margin):
        """Decoded counterfactual image x_cf = D([z1_cf, z2]) and its h_cf."""
        z_cf, h_cf = self.counterfactual_latent(z, h, pred, target, margin)
        return self.decoder(z_cf), h_cf
