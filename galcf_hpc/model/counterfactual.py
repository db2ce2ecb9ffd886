"""Counterfactual geometry in the hidden space h (ECINN-style closed form).

The Gaussians share unit covariance, so the decision boundary between classes p and t is
the hyperplane where -1/2||h-mu_p||^2 + log w_p = -1/2||h-mu_t||^2 + log w_t. Along the
unit direction d = (mu_t - mu_p)/||mu_t - mu_p|| the signed distance of h past that
boundary (towards t) is

    s(h) = (h - (mu_p + mu_t)/2) . d - (log w_p - log w_t) / ||mu_t - mu_p||,

so h + (margin - s(h)) d lies exactly ``margin`` past it. With more than two classes a
third class k may then be nearer than t; each such k is handled the same way along
(mu_t - mu_k), which only moves h towards mu_t, until t wins every pairwise comparison.
"""

import torch


def boundary_distance(h, mu_from, mu_to, lw_from, lw_to):
    """Signed distance of rows of h past the from/to decision boundary, towards ``to``."""
    diff = mu_to - mu_from
    norm = diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = diff / norm
    s = ((h - 0.5 * (mu_from + mu_to)) * d).sum(-1) - (lw_from - lw_to) / norm.squeeze(-1)
    return s, d


def counterfactual_h(h, pred, target, means, log_weights, margin=1.0, max_iter=20):
    """Move each h[i] from its predicted class pred[i] just past the boundary into target[i].

    Rows with target == pred are returned unchanged (a galaxy is its own counterfactual).
    Returns the moved h.
    """
    h_in = h
    h = h.clone()
    src = pred.clone()
    for _ in range(max_iter):
        s, d = boundary_distance(h, means[src], means[target], log_weights[src], log_weights[target])
        step = (margin - s).clamp_min(0.0)
        step = torch.where(src == target, torch.zeros_like(step), step)
        h = h + step[:, None] * d
        # the strongest competitor of t after the move (other than t itself)
        logits = -0.5 * (h[:, None, :] - means[None]).pow(2).sum(-1) + log_weights
        masked = logits.clone()
        masked[torch.arange(h.shape[0]), target] = -float("inf")
        rival = masked.argmax(1)
        s_rival, _ = boundary_distance(h, means[rival], means[target], log_weights[rival], log_weights[target])
        needs = s_rival < margin - 1e-6
        if not bool(needs.any()):
            break
        src = torch.where(needs, rival, target)
    return torch.where((pred == target)[:, None], h_in, h)
