import pytest
import torch

from galcf_hpc.model.counterfactual import boundary_distance, counterfactual_h
from galcf_hpc.model.flow import build_flow, flow_forward, flow_inverse
from galcf_hpc.model.gmm import class_logits, initial_means


def _trained_like_flow(dim=8):
    flow = build_flow(dim, blocks=4, hidden=32, clamp=2.0, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial weights (the last layers start at zero)
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return flow


def test_flow_inverse_within_1e4():
    flow = _trained_like_flow()
    z = torch.randn(64, 8)
    h, _ = flow_forward(flow, z)
    assert (h - z).abs().max() > 0.1  # not the identity
    assert (flow_inverse(flow, h) - z).abs().max() < 1e-4


def test_flow_logdet_matches_autograd_jacobian():
    flow = _trained_like_flow(dim=6).double()
    z = torch.randn(5, 6, dtype=torch.float64)
    _, logdet = flow_forward(flow, z)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda v: flow_forward(flow, v[None])[0][0], z[i])
        assert abs(float(torch.linalg.slogdet(jac)[1]) - float(logdet[i].detach())) < 1e-6


def test_flow_deterministic_per_seed():
    a, b = build_flow(8, 3, 16, 2.0, seed=5), build_flow(8, 3, 16, 2.0, seed=5)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_boundary_distance_two_classes_by_hand():
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    lw = torch.zeros(2)
    s, d = boundary_distance(torch.tensor([[1.0, 3.0]]), means[[0]], means[[1]], lw[[0]], lw[[1]])
    assert torch.allclose(s, torch.tensor([-1.0])) and torch.allclose(d, torch.tensor([[1.0, 0.0]]))
    # unequal weights shift the boundary towards the lighter class
    lw = torch.log(torch.tensor([0.8, 0.2]))
    s2, _ = boundary_distance(torch.tensor([[2.0, 0.0]]), means[[0]], means[[1]], lw[[0]], lw[[1]])
    assert torch.allclose(s2, -(lw[0] - lw[1]) / 4.0)


def test_counterfactual_h_lands_margin_past_boundary():
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    h = torch.tensor([[0.5, 1.0]])
    out = counterfactual_h(h, torch.tensor([0]), torch.tensor([1]), means, torch.zeros(2), margin=0.5)
    assert torch.allclose(out, torch.tensor([[2.5, 1.0]]))


def test_counterfactual_h_multiclass_always_reaches_target():
    torch.manual_seed(0)
    means = initial_means(10, 4, 5.0)
    lw = torch.full((10,), -torch.log(torch.tensor(10.0)))
    h = means[torch.arange(200) % 10] + torch.randn(200, 4)
    pred = class_logits(h, means, lw).argmax(1)
    target = (pred + 1 + torch.randint(0, 9, (200,))) % 10
    out = counterfactual_h(h, pred, target, means, lw, margin=0.3)
    logits = class_logits(out, means, lw)
    assert torch.equal(logits.argmax(1), target)
    top2 = logits.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 0  # strictly inside
    # same-class requests leave h untouched
    same = counterfactual_h(h, pred, pred, means, lw, margin=0.3)
    assert torch.equal(same, h)


def test_translate_placement_keeps_the_offset_from_the_mean():
    means = torch.tensor([[0.0, 0.0], [6.0, 0.0]])
    h = torch.tensor([[-0.5, 1.0]])
    out = counterfactual_h(h, torch.tensor([0]), torch.tensor([1]), means, torch.zeros(2), margin=0.5, mode="translate")
    assert torch.allclose(out, torch.tensor([[5.5, 1.0]]))  # h - mu_0 + mu_1
    # a translated point that would still sit short of the boundary is moved on to margin past it
    h = torch.tensor([[2.9, 0.0]])  # near the boundary at x=3, on class 0's side
    out = counterfactual_h(h, torch.tensor([0]), torch.tensor([1]), means, torch.zeros(2), margin=0.5, mode="translate")
    assert torch.allclose(out, torch.tensor([[8.9, 0.0]]))
    half = counterfactual_h(
        torch.tensor([[-0.5, 1.0]]), torch.tensor([0]), torch.tensor([1]), means, torch.zeros(2), margin=0.5, mode=0.5
    )
    # boundary placement (3.5, 1) and translated (5.5, 1): half way
    assert torch.allclose(half, torch.tensor([[4.5, 1.0]]))
    # the fraction as an HDF5 attribute or a command line gives it: a numeric string
    quarter = counterfactual_h(
        torch.tensor([[-0.5, 1.0]]),
        torch.tensor([0]),
        torch.tensor([1]),
        means,
        torch.zeros(2),
        margin=0.5,
        mode="0.75",
    )
    assert torch.allclose(quarter, torch.tensor([[5.0, 1.0]]))
    for bad in ("middle", 1.5, -0.1, True, None):
        with pytest.raises(ValueError, match="boundary.*translate.*number in \\[0, 1\\]"):
            counterfactual_h(h, torch.tensor([0]), torch.tensor([1]), means, torch.zeros(2), mode=bad)


def test_translate_placement_multiclass_reaches_target_and_is_in_distribution():
    torch.manual_seed(1)
    means = initial_means(10, 16, 5.0)
    lw = torch.full((10,), -torch.log(torch.tensor(10.0)))
    src = torch.arange(2000) % 10
    h = means[src] + torch.randn(2000, 16)
    pred = class_logits(h, means, lw).argmax(1)
    target = (pred + 1 + torch.randint(0, 9, (2000,))) % 10
    out = counterfactual_h(h, pred, target, means, lw, margin=0.3, mode="translate")
    assert torch.equal(class_logits(out, means, lw).argmax(1), target)
    # offsets from the target mean are as spread as real class members' offsets (unit variance)
    spread = (out - means[target]).std(0).mean()
    assert 0.9 < float(spread) < 1.15
    with pytest.raises(ValueError, match="placement"):
        counterfactual_h(h, pred, target, means, lw, mode="far")
