"""Counterfactual geometry in the hidden space h (ECINN-style closed form).

The Gaussians share unit covariance, so the decision boundary between classes p and t is
the hyperplane where -1/2||h-mu_p||^2 + log w_p = -1/2||h-mu_t||^2 + log w_t. Along the
unit direction d = (mu_t - mu_p)/||mu_t - mu_p|| the signed distance of h past that
boundary (towards t) is

    s(h) = (h - (mu_p + mu_t)/2) . d - (log w_p - log w_t) / ||mu_t - mu_p||,

so h + (margin - s(h)) d lies exactly ``margin`` past it. With more than two classes a
third class k may then be nearer than t; each such k is handled the same way along
(mu_t - mu_k), which only moves h towards mu_t, until t wins every pairwise comparison.

Placements (``mode``):
- ``boundary``: the smallest move, ``margin`` past the boundary (ECINN's closed form);
- ``translate``: h - mu_p + mu_t, the same position relative to the target's mean as h has
  relative to its own; with unit-variance Gaussians it is distributed like the hidden
  vectors of real galaxies of class t, where the boundary placement lies at the edge
  between the two classes. The boundary step then still applies where needed;
- a number alpha in [0, 1]: the boundary placement moved a fraction alpha of the way to the
  translated one (per row when a tensor is given).
"""

import torch

from ..config import placement_choice


def boundary_distance(h, mu_from, mu_to, lw_from, lw_to):
    """Signed distance of rows of h past the from/to decision boundary, towards ``to``."""
    diff = mu_to - mu_from
    norm = diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = diff / norm
    s = ((h - 0.5 * (mu_from + mu_to)) * d).sum(-1) - (lw_from - lw_to) / norm.squeeze(-1)
    return s, d


def placement_value(mode):
    """``mode`` as ``counterfactual_h`` uses it: a tensor of per-row fractions as given, else
    :func:`galcf_hpc.config.placement_choice` (``"boundary"``, ``"translate"`` or a fraction
    alpha in [0, 1]); ValueError for anything else."""
    if torch.is_tensor(mode):
        return mode
    try:
        return placement_choice(mode)
    except ValueError as exc:
        raise ValueError(f"counterfactual placement {exc}") from None


def counterfactual_h(h, pred, target, means, log_weights, margin=1.0, max_iter=20, mode="boundary"):
    """Move each h[i] from its predicted class pred[i] into target[i] (placement ``mode``,
    see above), ending at least ``margin`` past every boundary of the target.

    Rows with target == pred are returned unchanged (a galaxy is its own counterfactual).
    Returns the moved h.
    """
    mode = placement_value(mode)
    own = (pred == target)[:, None]
    near = past_boundary(h, pred, target, means, log_weights, margin, max_iter)
    if isinstance(mode, str) and mode == "boundary":
        return torch.where(own, h, near)
    # the translated point can still lie short of the boundary (its own class, or a third
    # one, nearer): the same closed-form steps finish the move from there
    moved = h - means[pred] + means[target]
    far = past_boundary(moved, pred, target, means, log_weights, margin, max_iter)
    if isinstance(mode, str):
        return torch.where(own, h, far)
    alpha = torch.as_tensor(mode, dtype=h.dtype, device=h.device).reshape(-1, 1)
    return torch.where(own, h, near + alpha * (far - near))


def past_boundary(h, src, target, means, log_weights, margin=1.0, max_iter=20):
    """Closed-form steps that put each row of h at least ``margin`` past the boundary between
    class src[i] and target[i], then past that of any rival class nearer than the target."""
    h = h.clone()
    src = src.clone()
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
    return h
