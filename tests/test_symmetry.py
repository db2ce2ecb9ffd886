"""model.classify_views: the model's class averaged over symmetric views of each galaxy."""

import pytest
import torch

from galcf_hpc.config import config_from_dict
from galcf_hpc.errors import ConfigError
from galcf_hpc.model.galcf import GalaxyCF, dihedral_views


def _model(views=1):
    torch.manual_seed(0)
    cfg = config_from_dict(
        {"data": {"image_size": 16}, "model": {"channels": [8, 16], "z_dim": 12, "z1_dim": 6, "classify_views": views}}
    )
    model = GalaxyCF.from_config(cfg).eval()
    with torch.no_grad():  # class means close together: the classes differ between these images
        model.means.mul_(0.05)
    return model


def test_dihedral_views_are_the_symmetries_of_the_square():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    for n in (1, 2, 4, 8):
        views = list(dihedral_views(x, n))
        assert len(views) == n and torch.equal(views[0], x)
        assert len({tuple(v.flatten().tolist()) for v in views}) == n  # all different
        for v in views:  # every view moves pixels, never changes them
            assert sorted(v.flatten().tolist()) == sorted(x.flatten().tolist())
    # the eight views of a rotated (or mirrored) image are the same eight
    eight = {tuple(v.flatten().tolist()) for v in dihedral_views(x, 8)}
    for moved in (torch.rot90(x, 1, (2, 3)), x.flip(2)):
        assert {tuple(v.flatten().tolist()) for v in dihedral_views(moved, 8)} == eight
    with pytest.raises(ValueError, match="one of"):
        list(dihedral_views(x, 3))


def test_eight_views_make_the_class_independent_of_orientation():
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    turned = torch.rot90(x, 1, (2, 3)).flip(3)
    one, eight = _model(1), _model(8)
    a, b = eight.classify(x), eight.classify(turned)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert torch.equal(a.pred, b.pred)
    assert (a.logits.exp().sum(1) - 1).abs().max() < 1e-4  # log of mean probabilities
    # one view reads the same galaxies differently once they are turned
    assert (one.classify(x).logits - one.classify(turned).logits).abs().max() > 1e-2
    # h and z, from which counterfactuals are built, are those of the image as given
    single = one.classify(x)
    assert torch.allclose(a.h, single.h) and torch.allclose(a.z, single.z)
    assert torch.equal(eight.classify(x, views=1).logits, single.logits)
    # the mean of the views' probabilities, not of one view
    probs = torch.stack([one.classify(v).logits.softmax(1) for v in dihedral_views(x, 8)]).mean(0)
    assert torch.allclose(a.logits.exp(), probs, atol=1e-5)


def test_classify_views_is_checked():
    with pytest.raises(ConfigError, match="classify_views"):
        config_from_dict({"model": {"classify_views": 3}})
    with pytest.raises(ValueError, match="classify_views"):
        GalaxyCF(16, [8, 16], 12, 6, 2, 16, 2.0, 5.0, classify_views=6)


def test_cf_symmetry_reencodes_an_exact_symmetry_of_x_cf(monkeypatch):
    """loss.cf_symmetry: the consistency term's class comes from the frozen encoder's reading
    of x_cf turned by a rotation/mirror of the pixel grid (no resampling, no noise); z2 is
    still compared on x_cf as decoded."""
    import galcf_hpc.train.objective as objective

    cfg = config_from_dict(
        {"data": {"image_size": 16}, "model": {"channels": [8, 16]}, "loss": {"cf_symmetry": True, "cf_z2": 1.0}}
    )
    model = GalaxyCF.from_config(cfg).train()
    real_call, read, decoded = objective.functional_call, [], []

    def recording_call(module, params, args):
        if module is model.encoder:
            read.append(args[0].detach().clone())
        return real_call(module, params, args)

    real_decoder = model.decoder.forward
    monkeypatch.setattr(model.decoder, "forward", lambda z: decoded.append(out := real_decoder(z)) or out)
    monkeypatch.setattr(objective, "functional_call", recording_call)
    turned = 0
    for seed in range(6):
        torch.manual_seed(seed)
        lat = model(torch.rand(4, 3, 16, 16))
        read.clear()
        objective.consistency_loss(model, lat.z.detach(), lat.h.detach(), lat.recon.detach(), cfg.loss)
        x_cf = decoded[-1].detach()
        assert len(read) == 2 and torch.equal(read[0], x_cf)  # z2: x_cf as decoded
        matches = [i for i, v in enumerate(dihedral_views(x_cf, 8)) if torch.equal(v, read[1])]
        assert matches, "the class is read from a view that is no symmetry of x_cf"
        turned += matches[0] != 0
    assert turned >= 3  # not the image as decoded every time
    # without the key the encoder reads x_cf once, as decoded
    read.clear()
    cfg.loss.cf_symmetry = False
    objective.consistency_loss(model, lat.z.detach(), lat.h.detach(), lat.recon.detach(), cfg.loss)
    assert len(read) == 1
