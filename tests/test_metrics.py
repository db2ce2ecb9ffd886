"""MSD, SSIM (against scikit-image) and validity."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from galcf_hpc.metrics import msd, ssim, validity


def _ref_ssim(a, b, gaussian):
    """skimage SSIM for each image of [B, C, H, W] numpy batches."""
    out = []
    for x, y in zip(a, b):
        x = np.transpose(x, (1, 2, 0))
        y = np.transpose(y, (1, 2, 0))
        if gaussian:
            out.append(
                structural_similarity(
                    x,
                    y,
                    channel_axis=-1,
                    data_range=1.0,
                    gaussian_weights=True,
                    sigma=1.5,
                    use_sample_covariance=False,
                )
            )
        else:
            out.append(structural_similarity(x, y, channel_axis=-1, data_range=1.0))
    return np.array(out)


def _structured(size, rng):
    """Smooth galaxy-like blobs plus stripes and noise, in [0, 1]."""
    yy, xx = np.mgrid[:size, :size] / size
    imgs = []
    for _ in range(2):
        cx, cy, w = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.02, 0.1)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / w)
        stripes = 0.2 * (np.sin(20 * xx + rng.uniform(0, 6)) > 0)
        img = np.stack([blob * c + stripes for c in rng.uniform(0.4, 1.0, 3)])
        imgs.append(np.clip(img + 0.03 * rng.standard_normal(img.shape), 0, 1))
    return np.stack(imgs)


@pytest.mark.parametrize("size", [32, 64, 33])
@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_matches_skimage(size, gaussian, kind):
    rng = np.random.default_rng(size + 7 * gaussian)
    if kind == "random":
        a = rng.random((3, 3, size, size))
        b = np.clip(a + rng.normal(0, 0.15, a.shape), 0, 1)
    else:
        a = _structured(size, rng)
        b = np.clip(0.9 * a + 0.05 + rng.normal(0, 0.05, a.shape), 0, 1)
    got = ssim(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), gaussian=gaussian)
    ref = _ref_ssim(a.astype(np.float32), b.astype(np.float32), gaussian)
    assert got.shape == (a.shape[0],)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-3)


def test_ssim_float64_is_exact():
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 3, 40, 36)), rng.random((2, 3, 40, 36))
    got = ssim(torch.tensor(a), torch.tensor(b))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _ref_ssim(a, b, False), atol=1e-10)


def test_ssim_other_window_and_single_channel():
    rng = np.random.default_rng(1)
    a, b = rng.random((1, 1, 20, 20)), rng.random((1, 1, 20, 20))
    got = ssim(torch.tensor(a), torch.tensor(b), win_size=5)
    ref = structural_similarity(a[0, 0], b[0, 0], win_size=5, data_range=1.0)
    assert abs(float(got[0]) - ref) < 1e-10


def test_ssim_identical_images_is_one():
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(ssim(x, x), torch.ones(4))
    torch.testing.assert_close(ssim(x, x, gaussian=True), torch.ones(4))
    assert torch.all(ssim(x, 1 - x) < 0.5)


def test_ssim_input_errors():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="shape"):
        ssim(x, torch.rand(2, 3, 16, 15))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ssim(x[0], x[0])
    with pytest.raises(ValueError, match="window"):
        ssim(torch.rand(1, 3, 6, 6), torch.rand(1, 3, 6, 6))
    with pytest.raises(ValueError, match="window"):
        ssim(torch.rand(1, 3, 10, 10), torch.rand(1, 3, 10, 10), gaussian=True)  # 11 taps
    with pytest.raises(ValueError, match="odd"):
        ssim(x, x, win_size=4)


def test_msd_hand_computed():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])
    torch.testing.assert_close(msd(a, b), torch.tensor([0.25, 0.25]))
    c = torch.zeros(1, 2, 1, 2)
    d = torch.tensor([[[[0.1, 0.2]], [[0.3, 0.4]]]])
    torch.testing.assert_close(msd(c, d), torch.tensor([(0.01 + 0.04 + 0.09 + 0.16) / 4]))
    assert msd(b, b).tolist() == [0.0, 0.0]


def test_msd_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        msd(torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError):
        msd(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4))


def test_validity():
    pred = torch.tensor([0, 3, 2, 2])
    target = torch.tensor([0, 1, 2, 5])
    out = validity(pred, target)
    assert out.dtype == torch.bool and out.tolist() == [True, False, True, False]
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0]])
    assert validity(logits, torch.tensor([1, 1])).tolist() == [True, False]
    assert validity(pred, 2).tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match="shape"):
        validity(pred, torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        validity(torch.zeros(2, 2, 2), target)


def test_luminance_share_recolouring_is_zero_and_brightening_is_one():
    from galcf_hpc.metrics import luminance_share

    rng = np.random.default_rng(3)
    x = torch.as_tensor(rng.uniform(0.2, 0.6, (4, 3, 16, 16)))
    # move flux between the bands at constant total: a pure change of colour
    shift = torch.as_tensor(rng.normal(0, 0.05, (4, 1, 16, 16)))
    recoloured = x + torch.cat([shift, -0.5 * shift, -0.5 * shift], dim=1)
    assert float(luminance_share(recoloured - x).abs().max()) < 1e-6
    # the same structure added to every band: all luminance
    assert torch.allclose(luminance_share(x + shift - x), torch.ones(4))
    # orthogonal split: energies add up, so a known mix gives its share
    mixed = torch.cat([shift, -shift, torch.zeros_like(shift)], dim=1) + 2 * shift  # chroma (1,-1,0), lum 2
    expected = (3 * 4) / (3 * 4 + 2)  # |lum|^2 = 3 * 2^2, |chroma|^2 = 1 + 1 per unit of shift^2
    assert torch.allclose(luminance_share(mixed), torch.full((4,), expected, dtype=torch.float32), atol=1e-6)
    assert torch.isnan(luminance_share(torch.zeros(1, 3, 8, 8))).all()


def test_luminance_share_is_not_a_colour_weighted_mean():
    """A wrong split (e.g. a single band, or RGB display weights) gives a recolouring a share
    far from zero; the band mean gives exactly zero for any flux-conserving recolouring."""
    from galcf_hpc.metrics import luminance_share

    delta = torch.zeros(1, 3, 4, 4)
    delta[:, 0] = 0.1
    delta[:, 2] = -0.1  # g brighter, z fainter, same total
    assert float(luminance_share(delta)) == 0.0


def test_classification_numbers_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, recall_score
    from sklearn.metrics import confusion_matrix as sk_cm

    from galcf_hpc.metrics import accuracy, confusion_matrix, macro_f1, per_class_accuracy

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 500)
    labels[labels == 4] = 5  # a class absent from the labels
    preds = np.where(rng.uniform(size=500) < 0.7, labels, rng.integers(0, 6, 500))
    cm = confusion_matrix(torch.as_tensor(labels), torch.as_tensor(preds), 6)
    assert np.array_equal(cm.numpy(), sk_cm(labels, preds, labels=range(6)))
    assert accuracy(cm) == pytest.approx(accuracy_score(labels, preds))
    present = sorted(set(labels.tolist()))
    assert macro_f1(cm) == pytest.approx(f1_score(labels, preds, labels=present, average="macro"))
    recall = recall_score(labels, preds, labels=present, average=None)
    got = [per_class_accuracy(cm)[c] for c in present]
    assert np.allclose(got, recall)
    assert np.isnan(per_class_accuracy(cm)[4])


@pytest.mark.parametrize("gaussian", [False, True])
def test_ssim_float32_matches_float64(gaussian):
    # float32 inputs are computed in float32: smooth galaxies (small local variances, where
    # E[x^2] - E[x]^2 cancels most) and small counterfactual-sized changes included
    rng = np.random.default_rng(3)
    a = np.concatenate([_structured(32, rng), 0.3 + 0.01 * rng.random((3, 3, 32, 32))])
    b = np.clip(a + rng.normal(0, 0.01, a.shape), 0, 1)
    f64 = ssim(torch.tensor(a), torch.tensor(b), gaussian=gaussian)
    f32 = ssim(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), gaussian=gaussian)
    assert f32.dtype == torch.float32
    np.testing.assert_allclose(f32.numpy(), f64.numpy(), atol=2e-6)


def test_ssim_is_float32_also_under_bf16_autocast():
    # the training step runs under bf16 autocast on GPUs and with train.cpu_bf16: SSIM's
    # filtering must not follow it, or E[x^2] - E[x]^2 cancels to nothing and the loss to -inf
    rng = np.random.default_rng(4)
    a = np.concatenate([_structured(32, rng), 0.3 + 0.01 * rng.random((3, 3, 32, 32))])
    b = np.clip(a + rng.normal(0, 0.01, a.shape), 0, 1)
    a, b = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = ssim(a, b)
    assert under.dtype == torch.float32
    np.testing.assert_allclose(under.numpy(), ssim(a, b).numpy(), atol=1e-7)
