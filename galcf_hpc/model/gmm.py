"""Gaussian-mixture hidden space: one unit-variance Gaussian per class with trainable means;
a galaxy's class is the nearest mean."""

import math

import torch


def initial_means(num_classes, dim, distance, seed=0):
    """Class means with pairwise distance ``distance`` where possible.

    With dim >= num_classes the means sit on scaled orthogonal axes (pairwise distance
    exactly ``distance``). With fewer dimensions than classes that scheme would leave
    means at zero, so points are spread by a few hundred steps of pairwise repulsion on a
    sphere whose radius gives that distance for the closest pair.
    """
    if dim >= num_classes:
        mu = torch.zeros(num_classes, dim)
        mu[torch.arange(num_classes), torch.arange(num_classes)] = distance / math.sqrt(2)
        return mu
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(num_classes, dim, generator=g)
    pts = pts / pts.norm(dim=1, keepdim=True)
    for _ in range(500):
        diff = pts[:, None, :] - pts[None, :, :]
        d2 = (diff**2).sum(-1) + torch.eye(num_classes)
        force = (diff / d2[..., None] ** 1.5).sum(1)
        pts = pts + 0.05 * force
        pts = pts / pts.norm(dim=1, keepdim=True)
    dmin = torch.cdist(pts, pts).add(torch.eye(num_classes) * 1e9).min()
    return pts * (distance / dmin)


def class_logits(h, means, log_weights):
    """log w_c + log N(h; mu_c, I) up to the shared constant: -1/2 ||h - mu_c||^2 + log w_c."""
    d2 = (h[:, None, :] - means[None, :, :]).pow(2).sum(-1)
    return -0.5 * d2 + log_weights
