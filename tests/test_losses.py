import math

import pytest
import torch

from galcf_hpc.model.gmm import class_logits, initial_means
from galcf_hpc.model.losses import ib_loss, mmd_unbiased, perceptual_loss, rbf_kernel


def test_rbf_kernel_hand_values():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0]])
    k = rbf_kernel(a, b, bandwidth=4.0)
    assert torch.allclose(k, torch.tensor([[math.exp(-1.0)], [math.exp(-5.0 / 4.0)]]))


def test_mmd_unbiased_hand_computed():
    z = torch.tensor([[0.0], [1.0]])
    n = torch.tensor([[0.0], [2.0], [3.0]])
    bw = 2.0

    def k(d2):
        return math.exp(-d2 / bw)

    zz = 2 * k(1) / (2 * 1)
    nn = 2 * (k(4) + k(9) + k(1)) / (3 * 2)
    zn = (k(0) + k(4) + k(9) + k(1) + k(1) + k(4)) / 6
    expected = zz + nn - 2 * zn
    assert abs(float(mmd_unbiased(z, n, bw)) - expected) < 1e-6


def test_mmd_same_distribution_near_zero_and_shift_positive():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g)
    b = torch.randn(400, 8, generator=g)
    assert abs(float(mmd_unbiased(a, b, 16.0))) < 0.01
    assert float(mmd_unbiased(a + 2.0, b, 16.0)) > 0.2


def test_ib_loss_hand_computed():
    h = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    logdet = torch.tensor([0.5, -1.0])
    means = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    logw = torch.log(torch.tensor([0.25, 0.75]))
    labels = torch.tensor([0, 1])
    beta = 3.0
    # logits per sample: -1/2 d^2 + log w
    l0 = [-0.0 + math.log(0.25), -2.0 + math.log(0.75)]
    l1 = [-2.5 + math.log(0.25), -0.5 + math.log(0.75)]

    def lse(v):
        return math.log(sum(math.exp(x) for x in v))

    lx = ((-lse(l0) - 0.5) / 2 + (-lse(l1) + 1.0) / 2) / 2
    ly = ((l0[0] - lse(l0) - math.log(0.25)) + (l1[1] - lse(l1) - math.log(0.75))) / 2
    expected = 2 / (1 + beta) * lx - 2 * beta / (1 + beta) * ly
    total, got_x, got_y = ib_loss(h, logdet, labels, means, logw, beta)
    assert abs(float(got_x) - lx) < 1e-6 and abs(float(got_y) - ly) < 1e-6
    assert abs(float(total) - expected) < 1e-6


def test_perceptual_loss_sums_layer_mse():
    a = [torch.ones(1, 2, 2, 2), torch.zeros(1, 1, 3, 3)]
    b = [torch.zeros(1, 2, 2, 2), torch.full((1, 1, 3, 3), 2.0)]
    assert float(perceptual_loss(a, b)) == 1.0 + 4.0


def test_class_logits_and_means():
    means = initial_means(10, 32, 5.0)
    d = torch.cdist(means, means) + torch.eye(10) * 100
    assert torch.allclose(d.min(), torch.tensor(5.0), atol=1e-5)
    small = initial_means(10, 4, 5.0)  # fewer dims than classes: must not collapse
    d = torch.cdist(small, small) + torch.eye(10) * 100
    assert float(d.min()) >= 5.0 - 1e-4
    h = means[[3, 7]] + 0.1
    assert class_logits(h, means, torch.zeros(10)).argmax(1).tolist() == [3, 7]


def test_critic_hinge_stops_at_its_margin_and_cross_entropy_does_not():
    import torch.nn.functional as F

    from galcf_hpc.train.objective import critic_loss

    logits = torch.tensor([[3.0, 0.5, 0.0], [0.0, 1.0, 2.5]], requires_grad=True)
    target = torch.tensor([0, 1])
    # sample 0 prefers its target by 2.5 (past a margin of 2: nothing), sample 1 by -1.5
    hinge = critic_loss(logits, target, 2.0)
    assert math.isclose(hinge.item(), (0.0 + (2.0 + 1.5)) / 2, rel_tol=1e-6)
    hinge.backward()
    assert logits.grad[0].abs().sum() == 0 and logits.grad[1].tolist() == [0.0, -0.5, 0.5]
    assert torch.equal(critic_loss(logits, target, 0.0), F.cross_entropy(logits, target))
    assert critic_loss(logits.detach(), torch.tensor([0, 2]), 1.0).item() == 0.0


def test_decoder_depth_refines_at_every_resolution_and_refuses_other_checkpoints():
    """model.decoder_depth: each decoder stage upsamples once and then refines at that
    resolution; the image comes out the same size, and a checkpoint of another depth is
    refused with the configuration named."""
    from galcf_hpc.config import config_from_dict
    from galcf_hpc.errors import CheckpointError
    from galcf_hpc.model.galcf import GalaxyCF
    from galcf_hpc.train.checkpoint import check_compatible

    def model(depth):
        torch.manual_seed(0)
        cfg = config_from_dict(
            {
                "data": {"image_size": 16},
                "model": {"channels": [8, 16], "z_dim": 12, "z1_dim": 6, "decoder_depth": depth},
            }
        )
        return GalaxyCF.from_config(cfg)

    shallow, deep = model(1), model(3)
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for b in deep.decoder.blocks]
    out = deep.decoder(torch.randn(2, 12))
    for h in hooks:
        h.remove()
    assert out.shape == shallow.decoder(torch.randn(2, 12)).shape == (2, 3, 16, 16)
    assert sizes == [8, 8, 8, 16, 16, 16] and len(shallow.decoder.blocks) == 2
    assert [b.resample for b in deep.decoder.blocks] == ["up", None, None, "up", None, None]
    with pytest.raises(CheckpointError, match="another model configuration"):
        check_compatible(deep, shallow.state_dict(), "ckpt.pt")
    with pytest.raises(Exception, match="decoder_depth"):
        config_from_dict({"model": {"decoder_depth": 0}})


def _adversarial_model(**loss):
    from galcf_hpc.config import config_from_dict
    from galcf_hpc.model.galcf import GalaxyCF

    torch.manual_seed(0)
    model = {"channels": [8, 16], "z_dim": 12, "z1_dim": 6}
    cfg = config_from_dict({"data": {"image_size": 16}, "model": model, "loss": {"perceptual": 0.0, **loss}})
    return GalaxyCF.from_config(cfg).train(), cfg


def _grad_sum(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_patch_discriminator_scores_8x8_patches_at_every_size_and_exists_only_when_weighted():
    """One logit per patch, 8x8 patches from 16 to 256 px; the model builds the discriminator
    only when an adversarial weight is set, and a negative weight is refused."""
    from galcf_hpc.config import config_from_dict
    from galcf_hpc.model.discriminator import PatchDiscriminator

    for size in (16, 32, 64, 256):
        assert PatchDiscriminator(size)(torch.rand(2, 3, size, size)).shape == (2, 1, 8, 8)
    assert _adversarial_model()[0].discriminator is None
    assert _adversarial_model(cf_adversarial=0.5)[0].discriminator is not None
    with pytest.raises(Exception, match="rec_adversarial"):
        config_from_dict({"loss": {"rec_adversarial": -1.0}})


def test_discriminator_learns_from_its_hinge_only_and_the_decoder_from_its_frozen_scores():
    """loss.rec_adversarial: the discriminator's hinge (real galaxies > 1, detached x~ < -1)
    trains it and nothing else; -mean D(x~) with frozen D trains encoder and decoder and not D;
    before the counterfactual warm-up ends only the discriminator learns."""
    from galcf_hpc.train import objective

    model, cfg = _adversarial_model(rec_adversarial=0.5)
    images, labels = torch.rand(6, 3, 16, 16), torch.randint(0, 10, (6,))
    _, terms = objective.batch_losses(model, None, images, labels, cfg.loss, cf_active=False)
    assert "disc" in terms and "rec_adversarial" not in terms

    lat = model(images)
    parts = {}
    total = objective.adversarial_terms(model.discriminator, images, lat.recon, None, cfg.loss, True, parts)
    with torch.no_grad():
        real, fake = model.discriminator(images), model.discriminator(lat.recon)
    hinge = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
    assert abs(float(parts["disc"].detach()) - float(hinge)) < 1e-5
    assert abs(float(parts["rec_adversarial"].detach()) + float(fake.mean())) < 1e-5
    assert abs(float(total.detach()) - float((parts["disc"] + 0.5 * parts["rec_adversarial"]).detach())) < 1e-5

    parts["disc"].backward(retain_graph=True)
    assert _grad_sum(model.discriminator) > 0 and _grad_sum(model.decoder) == 0 and _grad_sum(model.encoder) == 0
    model.zero_grad()
    parts["rec_adversarial"].backward()
    assert _grad_sum(model.discriminator) == 0 and _grad_sum(model.decoder) > 0 and _grad_sum(model.encoder) > 0


def test_counterfactual_adversarial_term_scores_the_decoded_counterfactual_and_moves_only_the_decoder(monkeypatch):
    """loss.cf_adversarial: -mean of the frozen discriminator's patch scores of x_cf as decoded;
    its gradient reaches the decoder only, and the discriminator then also learns from x_cf."""
    from galcf_hpc.train import objective

    model, cfg = _adversarial_model(cf_adversarial=0.5, cf_fraction=1.0)
    decoded = []
    real_decoder = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda z: decoded.append(out := real_decoder(z)) or out)
    lat = model(torch.rand(6, 3, 16, 16))
    terms = objective.consistency_loss(model, lat.z.detach(), lat.h.detach(), lat.recon.detach(), cfg.loss)
    expected = -model.discriminator(decoded[-1].detach()).mean()
    assert abs(float(terms["cf_adversarial"].detach()) - float(expected.detach())) < 1e-5
    model.zero_grad()
    terms["cf_adversarial"].backward()
    assert _grad_sum(model.discriminator) == 0 and _grad_sum(model.encoder) == 0 and _grad_sum(model.decoder) > 0

    seen = []
    real_disc = model.discriminator.forward
    monkeypatch.setattr(model.discriminator, "forward", lambda x: seen.append(x.shape[0]) or real_disc(x))
    objective.batch_losses(model, None, torch.rand(6, 3, 16, 16), torch.randint(0, 10, (6,)), cfg.loss, True)
    # the frozen scores of x_cf, then the hinge: real galaxies, then the detached x~ and x_cf
    assert seen == [6, 6, 12]
