"""The training objective of one batch: L_R + L_MMD + L_IB (+ counterfactual consistency).

Counterfactual consistency (this package's addition, see docs/method.md): for part of
the batch a random target class t != prediction is drawn, h is moved past the decision
boundary in closed form, inverted through the flow and decoded with the galaxy's own z2.
The decoded counterfactual is re-encoded by a *frozen* copy of the encoder and flow (their
weights are detached for this term) and must be classified as t. Only the decoder learns
from this term: it cannot invent a private code the encoder learns to read, it has to
draw images that the classifier, trained on real galaxies only, puts into class t. This
is what makes the decoder listen to z1 (docs/method.md, "The crux").

What the frozen encoder accepts can still be a code only it reads. Optional terms make the
counterfactual convince more than one network (docs/method.md, "second level"): critics
trained here on real galaxies and frozen on x_cf (``loss.cf_critic``: luminance only,
``loss.cf_critic_colour``; of one or two architecture families, ``loss.cf_critic_family``),
a "decoded counterfactual" class for the critic (``loss.cf_realism``), re-encoding under
symmetries of the sky (``loss.cf_augment``; the exact ones of the pixel grid alone,
``loss.cf_symmetry``; for the critics only, ``loss.cf_critic_augment``),
a gradient-reversed class critic on z2 (``loss.z2_adversary``), other placements of h_cf
(``loss.cf_placement``) and a patch discriminator of real galaxies against x~ and x_cf
(``loss.rec_adversarial``, ``loss.cf_adversarial``). All of them are *trained against*; none
is a judge.
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..metrics import ssim
from ..model.galcf import dihedral_view
from ..model.gmm import class_logits
from ..model.losses import ib_loss, mmd_unbiased, perceptual_loss


def random_other_class(labels, num_classes, generator=None):
    """A uniformly drawn class different from each label."""
    offset = torch.randint(1, num_classes, labels.shape, device=labels.device, generator=generator)
    return (labels + offset) % num_classes


class _GradReverse(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -1 (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def random_symmetry(x):
    """One of the eight symmetries of the square (rot90 and flip), drawn on the host (no
    device sync), applied to the whole batch: exact, no pixel is resampled."""
    rotation = int(torch.randint(0, 4, ()))
    return dihedral_view(x, 2 * rotation + int(torch.randint(0, 2, ())))


def augment_for_reencoding(x):
    """A random symmetry of the sky (:func:`random_symmetry`), a shift of up to 2 pixels and
    Gaussian noise of up to 0.03: what a galaxy's class does not depend on. A counterfactual
    must keep its class through them, so pixel-exact codes stop working. The geometry is
    drawn on the host (no device sync), the noise on the images' device."""
    x = random_symmetry(x)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,)))
    x = torch.roll(x, (dy, dx), dims=(-2, -1))
    sigma = 0.03 * torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
    return x + sigma * torch.randn_like(x)


def critic_loss(logits, target, margin=0.0):
    """How far a critic is from putting x_cf into its target class. ``margin`` 0: the
    cross-entropy, which keeps pushing until the critic is certain; ``margin`` > 0: a hinge on
    the target's logit minus the best other class's, zero once the critic prefers the target
    by ``margin`` (no reward for changing the galaxy further)."""
    if margin <= 0:
        return F.cross_entropy(logits, target)
    own = logits.gather(1, target[:, None])[:, 0]
    best_other = logits.scatter(1, target[:, None], float("-inf")).amax(1)
    return F.relu(margin - (own - best_other)).mean()


def feature_distance(critic, recon, images):
    """Perceptual distance of x~ to x in a critic's features (``loss.rec_features``): at every
    stage the feature vector of each position is scaled to unit length, and the squared
    distance of the two, summed over channels, is averaged over positions, then over stages
    (each in [0, 4]). The critic is frozen here: only the decoder and encoder learn from it.
    The critics learn to classify galaxies, so their features respond to arms, bars, bulges
    and second nuclei, which a pixel MSE ruled by the bright core lets the decoder blur away."""

    def unit(f):
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-6)

    weights = _frozen(critic)
    with torch.no_grad():
        ref = functional_call(critic, weights, (images.float(),), {"stages": True})
    out = functional_call(critic, weights, (recon.float(),), {"stages": True})
    return sum(((unit(a.float()) - unit(b.float())) ** 2).sum(1).mean() for a, b in zip(out, ref)) / len(out)


def _frozen(module):
    return {k: v.detach() for k, v in module.named_parameters()} | dict(module.named_buffers())


def attacked(critic, x, labels, radius):
    """Images x moved by a one-step L2 attack on ``critic`` (a random start of half the
    radius, then a step along the normalised gradient of its cross-entropy, projected back
    into the ball). ``radius`` is per pixel (root mean square), so the ball grows with the
    image. A critic that learns from these (``loss.cf_critic_robust``) cannot be convinced by a
    small, unstructured change, so its gradient on a counterfactual asks for a visible one.
    The critic's weights get no gradient from the attack; x comes back detached."""

    def per_image(t):
        return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.dim() - 1))

    x = x.detach()
    ball = radius * x[0].numel() ** 0.5
    start = torch.randn_like(x)
    start = 0.5 * ball * start / per_image(start)
    with torch.enable_grad():
        delta = start.requires_grad_(True)
        loss = F.cross_entropy(functional_call(critic, _frozen(critic), (x + delta,)), labels)
        (grad,) = torch.autograd.grad(loss, delta)
    delta = start.detach() + ball * grad / per_image(grad)
    delta = delta * (ball / per_image(delta)).clamp(max=1.0)
    return x + delta


def batch_losses(model, vgg, images, labels, loss_cfg, cf_active):
    """Return (total loss, dict of detached 0-dim tensors) for one batch: the terms stay on
    the device, so nothing here waits for the GPU; the loop reads them when it logs."""
    lat = model(images, z1_noise=loss_cfg.z1_noise)
    z, recon = lat.z, lat.recon
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
    if loss_cfg.rec_ssim > 0:  # the pixel MSE is ruled by the bright core; SSIM weighs each window by its own contrast
        terms["rec_ssim"] = 1.0 - ssim(recon.float(), images.float()).mean()
        l_rec = l_rec + loss_cfg.rec_ssim * terms["rec_ssim"]

    bandwidth = loss_cfg.mmd_bandwidth or 2.0 * z.shape[1]
    h = lat.h
    with torch.autocast(images.device.type, enabled=False):  # the latent losses in fp32 under bf16 autocast
        terms["mmd"] = mmd_unbiased(z.float(), torch.randn_like(z.float()), bandwidth)
        l_ib, l_x, l_y = ib_loss(h.float(), lat.logdet.float(), labels, model.means, model.log_weights, loss_cfg.beta)
    terms.update(ib=l_ib, ib_x=l_x, ib_y=l_y)

    total = l_rec + loss_cfg.mmd * terms["mmd"] + loss_cfg.ib * l_ib

    for name, critic, _ in model.critics(loss_cfg):  # critics learn from real galaxies
        seen = images.detach()
        if name == "critic" and loss_cfg.cf_realism:  # ... and, for the realism class, reconstructions
            seen = torch.cat([seen, recon.detach()])
        seen, seen_labels = augment_for_reencoding(seen), labels.repeat(len(seen) // len(labels))
        if loss_cfg.cf_critic_robust > 0:
            seen = attacked(critic, seen, seen_labels, loss_cfg.cf_critic_robust)
        terms[f"{name}_real"] = F.cross_entropy(critic(seen), seen_labels)
        total = total + terms[f"{name}_real"]

    if loss_cfg.rec_critic > 0:  # the frozen critics must read the galaxy's own class in x~
        classes = model.means.shape[0]  # a realism critic's extra output is not a class
        terms["rec_critic"] = sum(
            weight * F.cross_entropy(functional_call(critic, _frozen(critic), (recon,))[:, :classes], labels)
            for _, critic, weight in model.critics(loss_cfg)
        )
        total = total + loss_cfg.rec_critic * terms["rec_critic"]

    if loss_cfg.rec_features > 0:  # x~ must look like x to networks that learnt what tells galaxies apart
        terms["rec_features"] = sum(
            weight * feature_distance(critic, recon, images) for _, critic, weight in model.critics(loss_cfg)
        )
        total = total + loss_cfg.rec_features * terms["rec_features"]

    if loss_cfg.z2_adversary > 0:
        terms["z2_critic"] = F.cross_entropy(model.z2_critic(_GradReverse.apply(lat.z2)), labels)
        total = total + loss_cfg.z2_adversary * terms["z2_critic"]

    k = int(round(loss_cfg.cf_fraction * images.shape[0]))
    if cf_active and loss_cfg.cf_consistency > 0 and k > 0:
        cf_terms = consistency_loss(model, z[:k], h[:k], recon[:k].detach(), loss_cfg)
        x_cf = cf_terms.pop("x_cf")
        terms.update(cf_terms)
        if loss_cfg.cf_realism and model.critic is not None and loss_cfg.cf_critic > 0:
            # the critic learns what a decoded counterfactual looks like
            logits = model.critic(augment_for_reencoding(x_cf.detach()))
            terms["critic_fake"] = F.cross_entropy(logits, torch.full_like(labels[:k], logits.shape[1] - 1))
            total = total + terms["critic_fake"]
        total = total + (
            loss_cfg.cf_consistency * cf_terms["cf"]
            + loss_cfg.cf_proximity * cf_terms["cf_l1"]
            + loss_cfg.cf_z2 * cf_terms["cf_z2"]
            + loss_cfg.cf_ssim * cf_terms.get("cf_ssim", 0.0)
            + loss_cfg.cf_adversarial * cf_terms.get("cf_adversarial", 0.0)
        )
    else:
        x_cf = None

    if model.discriminator is not None:
        total = total + adversarial_terms(model.discriminator, images, recon, x_cf, loss_cfg, cf_active, terms)

    with torch.no_grad():
        terms["acc"] = (class_logits(h, model.means, model.log_weights).argmax(1) == labels).float().mean()
    terms["loss"] = total
    return total, {key: v.detach() for key, v in terms.items()}


def consistency_loss(model, z, h, recon, loss_cfg):
    """Terms on decoded counterfactuals x_cf (re-encoded with the frozen encoder and flow):
    ``cf`` cross-entropy w.r.t. their targets (plus ``cf_critic`` times the frozen luminance
    critic's cross-entropy, ``cf_critic`` in the terms), ``cf_l1`` mean |x_cf - x~| (minimal
    change), ``cf_z2`` mean squared change of the re-encoded z2 (class-independent content kept)."""
    means = model.means.detach()
    with torch.no_grad():
        pred = class_logits(h.float(), means, model.log_weights).argmax(1)
        target = random_other_class(pred, means.shape[0])
        placement = loss_cfg.cf_placement
        if placement == "interpolate":  # every point of the path, not only its ends
            placement = torch.rand(len(pred), device=h.device)
    z_cf, _ = model.counterfactual_latent(z, h.float(), pred, target, loss_cfg.cf_margin, placement)
    z2 = model.split(z_cf)[1]
    x_cf = model.decoder(z_cf)
    encoder = _frozen(model.encoder)
    z_re = functional_call(model.encoder, encoder, (x_cf,))
    # the class must survive what a galaxy's class does not depend on; z2 (orientation,
    # position...) is compared on the image as decoded. cf_symmetry: only the symmetries of
    # the pixel grid, the views a model with classify_views > 1 averages over
    if loss_cfg.cf_augment:
        seen = augment_for_reencoding(x_cf)
    else:
        seen = random_symmetry(x_cf) if loss_cfg.cf_symmetry else x_cf
    z_seen = functional_call(model.encoder, encoder, (seen,)) if seen is not x_cf else z_re
    with torch.autocast(x_cf.device.type, enabled=False):  # the flow in fp32, as in GalaxyCF.forward
        h_re, _ = functional_call(model.flow, _frozen(model.flow), (model.split(z_seen)[0].float(),))
        logits = class_logits(h_re, means.float(), model.log_weights)
    terms = {
        "cf": F.cross_entropy(logits, target),
        "cf_l1": (x_cf.float() - recon.float()).abs().mean(),
        "cf_z2": F.mse_loss(model.split(z_re)[1], z2),
    }
    if loss_cfg.cf_ssim > 0:
        terms["cf_ssim"] = 1.0 - ssim(x_cf.float(), recon.float()).mean()

    # with cf_critic_augment every critic reads x_cf under its own random symmetry while the
    # explained model's encoder reads it as decoded: codes at fixed pixels stop convincing
    # the critics without asking the encoder to classify rotated counterfactuals
    def critic_view():
        return augment_for_reencoding(x_cf) if loss_cfg.cf_critic_augment and not loss_cfg.cf_augment else seen

    for name, critic, weight in model.critics(loss_cfg):
        logits = functional_call(critic, _frozen(critic), (critic_view(),))
        key = "cf_" + name.replace("colour_critic", "critic_colour")  # cf_critic, cf_critic_colour, ...
        terms[key] = critic_loss(logits, target, loss_cfg.cf_critic_margin)
        terms["cf"] = terms["cf"] + weight * terms[key]
    if model.discriminator is not None and loss_cfg.cf_adversarial > 0:  # x_cf must pass for a galaxy, patch by patch
        scores = functional_call(model.discriminator, _frozen(model.discriminator), (x_cf,))
        terms["cf_adversarial"] = -scores.float().mean()
    terms["x_cf"] = x_cf
    return terms


def adversarial_terms(disc, images, recon, x_cf, loss_cfg, cf_active, terms):
    """The patch discriminator's terms, added to ``terms``; returns their weighted sum. It
    learns real galaxies against detached x~ and, with ``loss.cf_adversarial``, x_cf, with a
    hinge on every patch (``disc``; every step, so that DDP sees all its parameters used);
    once the counterfactual terms are on (``cf_active``), its frozen scores of x~ train
    encoder and decoder (``loss.rec_adversarial``; the term on x_cf is one of
    :func:`consistency_loss`)."""
    fakes = [recon.detach()]
    if x_cf is not None and loss_cfg.cf_adversarial > 0:
        fakes.append(x_cf.detach())
    real = disc(images.detach()).float()
    fake = disc(torch.cat(fakes)).float()
    terms["disc"] = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    total = terms["disc"]
    if cf_active and loss_cfg.rec_adversarial > 0:
        terms["rec_adversarial"] = -functional_call(disc, _frozen(disc), (recon,)).float().mean()
        total = total + loss_cfg.rec_adversarial * terms["rec_adversarial"]
    return total
