"""The paper's losses as pure functions: L = L_R(x~, x) + L_MMD(z, n) + L_IB(z1, y)."""

import torch
import torch.nn.functional as F

from .gmm import class_logits


def perceptual_loss(feats_rec, feats_ref):
    """L_R: sum over VGG16 layers of the mean squared feature difference."""
    return sum(F.mse_loss(a, b) for a, b in zip(feats_rec, feats_ref))


def rbf_kernel(a, b, bandwidth):
    """k(a, b) = exp(-||a - b||^2 / bandwidth) for all pairs (rows of a and b)."""
    d2 = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
    return torch.exp(-d2 / bandwidth)


def mmd_unbiased(z, n, bandwidth):
    """Unbiased squared MMD between samples z (m x d) and n (k x d) (paper Eq. 3):
    mean_{i!=j} k(z_i, z_j) + mean_{i!=j} k(n_i, n_j) - 2 mean_{i,j} k(z_i, n_j)."""
    m, k = z.shape[0], n.shape[0]
    kzz = rbf_kernel(z, z, bandwidth)
    knn = rbf_kernel(n, n, bandwidth)
    kzn = rbf_kernel(z, n, bandwidth)
    term_zz = (kzz.sum() - kzz.diagonal().sum()) / (m * (m - 1))
    term_nn = (knn.sum() - knn.diagonal().sum()) / (k * (k - 1))
    return term_zz + term_nn - 2 * kzn.mean()


def ib_loss(h, logdet, labels, means, log_weights, beta):
    """IB-INN objective (Ardizzone et al. 2020) on h = F(z1 + noise).

    L_x = (-logsumexp_c(-1/2||h - mu_c||^2 + log w_c) - log|det J|) / dim(h)
    L_y = sum_c y_c (log_softmax_c(-1/2||h - mu_c||^2 + log w_c) - log w_c)
    L_IB = 2/(1+beta) L_x - 2 beta/(1+beta) L_y        (batch means)
    Returns (L_IB, L_x, L_y).
    """
    logits = class_logits(h, means, log_weights)
    dim = h.shape[1]
    l_x = ((-torch.logsumexp(logits, dim=1) - logdet) / dim).mean()
    log_post = torch.log_softmax(logits, dim=1)
    l_y = (log_post - log_weights).gather(1, labels[:, None]).squeeze(1).mean()
    l_ib = 2.0 / (1.0 + beta) * l_x - 2.0 * beta / (1.0 + beta) * l_y
    return l_ib, l_x, l_y
