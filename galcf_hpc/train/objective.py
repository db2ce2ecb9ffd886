"""The training objective of one batch: L_R + L_MMD + L_IB (+ counterfactual consistency).

Counterfactual consistency (this package's addition, see docs/method.md): for part of
the batch a random target class t != prediction is drawn, h is moved past the decision
boundary in closed form, inverted through the flow and decoded with the galaxy's own z2.
The decoded counterfactual is re-encoded by a *frozen* copy of the encoder and flow (their
weights are detached for this term) and must be classified as t. Only the decoder learns
from this term: it cannot invent a private code the encoder learns to read, it has to
draw images that the classifier, trained on real galaxies only, puts into class t. This
is what makes the decoder listen to z1 (DESIGN.md, "The crux").
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..model.flow import flow_forward
from ..model.gmm import class_logits
from ..model.losses import ib_loss, mmd_unbiased, perceptual_loss


def random_other_class(labels, num_classes, generator=None):
    """A uniformly drawn class different from each label."""
    offset = torch.randint(1, num_classes, labels.shape, device=labels.device, generator=generator)
    return (labels + offset) % num_classes


def _frozen(module):
    return {k: v.detach() for k, v in module.named_parameters()} | dict(module.named_buffers())


def batch_losses(model, vgg, images, labels, loss_cfg, cf_active):
    """Return (total loss, dict of float components) for one batch."""
    z = model.encoder(images)
    z1, _ = model.split(z)
    recon = model.decoder(z)
    terms = {}

    l_rec = images.new_zeros(())
    if loss_cfg.perceptual > 0:
        with torch.no_grad():
            ref = vgg(images)
        terms["perceptual"] = perceptual_loss(vgg(recon), ref)
        l_rec = l_rec + loss_cfg.perceptual * terms["perceptual"]
    if loss_cfg.pixel > 0:
        terms["pixel"] = F.mse_loss(recon, images)
        l_rec = l_rec + loss_cfg.pixel * terms["pixel"]

    bandwidth = loss_cfg.mmd_bandwidth or 2.0 * z.shape[1]
    terms["mmd"] = mmd_unbiased(z.float(), torch.randn_like(z.float()), bandwidth)

    h, logdet = flow_forward(model.flow, z1 + loss_cfg.z1_noise * torch.randn_like(z1))
    l_ib, l_x, l_y = ib_loss(h.float(), logdet.float(), labels, model.means, model.log_weights, loss_cfg.beta)
    terms.update(ib=l_ib, ib_x=l_x, ib_y=l_y)

    total = l_rec + loss_cfg.mmd * terms["mmd"] + loss_cfg.ib * l_ib

    k = int(round(loss_cfg.cf_fraction * images.shape[0]))
    if cf_active and loss_cfg.cf_consistency > 0 and k > 0:
        cf_terms = consistency_loss(model, z[:k], h[:k], recon[:k].detach(), loss_cfg)
        terms.update(cf_terms)
        total = total + (loss_cfg.cf_consistency * cf_terms["cf"] + loss_cfg.cf_proximity * cf_terms["cf_l1"]
                         + loss_cfg.cf_z2 * cf_terms["cf_z2"])

    with torch.no_grad():
        terms["acc"] = (class_logits(h, model.means, model.log_weights).argmax(1) == labels).float().mean()
    terms["loss"] = total
    return total, {key: float(v.detach()) for key, v in terms.items()}


def consistency_loss(model, z, h, recon, loss_cfg):
    """Terms on decoded counterfactuals x_cf (re-encoded with the frozen encoder and flow):
    ``cf`` cross-entropy w.r.t. their targets, ``cf_l1`` mean |x_cf - x~| (minimal change),
    ``cf_z2`` mean squared change of the re-encoded z2 (class-independent content kept)."""
    means = model.means.detach()
    with torch.no_grad():
        pred = class_logits(h.float(), means, model.log_weights).argmax(1)
        target = random_other_class(pred, means.shape[0])
    z_cf, _ = model.counterfactual_latent(z, h.float(), pred, target, loss_cfg.cf_margin)
    z2 = model.split(z_cf)[1]
    x_cf = model.decoder(z_cf)
    z_re = functional_call(model.encoder, _frozen(model.encoder), (x_cf,))
    h_re, _ = functional_call(model.flow, _frozen(model.flow), (model.split(z_re)[0],))
    logits = class_logits(h_re.float(), means, model.log_weights)
    return {"cf": F.cross_entropy(logits, target), "cf_l1": (x_cf - recon).abs().mean(),
            "cf_z2": F.mse_loss(model.split(z_re)[1], z2)}
