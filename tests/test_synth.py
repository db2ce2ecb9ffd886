"""Tests of the GalSim Galaxy10-like generator (galcf_hpc.data.synth).

Two module-scoped catalogs keep the file fast (~600 galaxies in all): a balanced one
(30 per class, no duplicates) for the physics and no-trivial-cue checks, and one with the
Galaxy10 class fractions and planted duplicates.
"""

import math

import numpy as np
import pytest

pytest.importorskip("galsim")

from galcf_hpc.data import synth  # noqa: E402
from galcf_hpc.data.classes import NUM_CLASSES, class_fractions  # noqa: E402

PER_CLASS = 30
BALANCED = [1.0 / NUM_CLASSES] * NUM_CLASSES


@pytest.fixture(scope="module")
def balanced():
    return synth.generate(PER_CLASS * NUM_CLASSES, 48, seed=11, class_fractions=BALANCED, duplicate_fraction=0.0)


@pytest.fixture(scope="module")
def galaxy10_like():
    return synth.generate(300, 32, seed=5, duplicate_fraction=0.02)


def _moments(img):
    """Flux-weighted second moments of the main object (the connected region around the
    brightest pixel near the centre, above 15% of its brightness) in the luminance."""
    from scipy import ndimage

    lum = img.astype(float).mean(axis=-1)
    bg = np.median(lum)
    smooth = ndimage.uniform_filter(lum, 3) - bg
    n = lum.shape[0]
    lo, hi = n // 2 - n // 8, n // 2 + n // 8
    centre = np.full_like(smooth, -np.inf)
    centre[lo:hi, lo:hi] = smooth[lo:hi, lo:hi]
    iy, ix = np.unravel_index(np.argmax(centre), centre.shape)
    labels, _ = ndimage.label(smooth > max(8.0, 0.15 * smooth[iy, ix]))
    w = np.where(labels == labels[iy, ix], np.clip(lum - bg, 0, None), 0.0)
    y, x = np.mgrid[:n, :n]
    s = w.sum()
    mx, my = (w * x).sum() / s, (w * y).sum() / s
    cxx = (w * (x - mx) ** 2).sum() / s
    cyy = (w * (y - my) ** 2).sum() / s
    cxy = (w * (x - mx) * (y - my)).sum() / s
    ev = np.linalg.eigvalsh([[cxx, cxy], [cxy, cyy]])
    size = math.sqrt(cxx + cyy)
    axis_ratio = math.sqrt(max(ev[0], 0.0) / ev[1])
    return size, axis_ratio


def test_format_is_astronn_galaxy10(balanced):
    d = balanced
    n = PER_CLASS * NUM_CLASSES
    assert set(d) == {"images", "ans", "ra", "dec", "redshift", "pxscale"}
    assert d["images"].dtype == np.uint8 and d["images"].shape == (n, 48, 48, 3)
    assert d["ans"].dtype == np.uint8 and d["ans"].shape == (n,)
    for key in ("ra", "dec", "redshift", "pxscale"):
        assert d[key].dtype == np.float64 and d[key].shape == (n,), key
    assert d["ans"].min() >= 0 and d["ans"].max() <= 9
    assert np.all((d["redshift"] >= 0.01) & (d["redshift"] <= 0.15))
    assert np.all((d["ra"] >= 0) & (d["ra"] < 360)) and np.all(np.abs(d["dec"]) < 90)
    # images are galaxies on a dark sky, not blank or saturated frames
    means = d["images"].reshape(n, -1).mean(axis=1)
    assert np.all(means > 2) and np.all(means < 120)
    assert np.all(d["images"].reshape(n, -1).max(axis=1) > 100)


def test_balanced_and_galaxy10_class_proportions(balanced, galaxy10_like):
    counts = np.bincount(balanced["ans"], minlength=NUM_CLASSES)
    assert counts.tolist() == [PER_CLASS] * NUM_CLASSES
    ans = galaxy10_like["ans"]
    frac = np.bincount(ans, minlength=NUM_CLASSES) / ans.size
    assert np.abs(frac - np.array(class_fractions())).max() < 0.01


def test_pxscale_two_values_with_about_5_percent_double(balanced, galaxy10_like):
    for d, size in ((balanced, 48), (galaxy10_like, 32)):
        base = 0.262 * 256 / size
        vals = np.unique(d["pxscale"])
        assert np.allclose(vals, [base, 2 * base][: len(vals)]), vals
    px = np.concatenate([balanced["pxscale"] / (0.262 * 256 / 48), galaxy10_like["pxscale"] / (0.262 * 256 / 32)])
    frac_double = np.mean(px > 1.5)
    assert 0.02 < frac_double < 0.09, frac_double


def _close_pairs(d, limit_arcsec):
    ra, dec = d["ra"], d["dec"]
    dra = (ra[:, None] - ra[None, :]) * np.cos(np.radians(dec))[:, None]
    sep = np.hypot(dra, dec[:, None] - dec[None, :]) * 3600.0
    i, j = np.nonzero(np.triu(sep < limit_arcsec, k=1))
    return list(zip(i.tolist(), j.tolist()))


def test_duplicates_planted_within_one_arcsec(balanced, galaxy10_like):
    assert _close_pairs(balanced, 5.0) == []  # none asked for, none by chance
    pairs = _close_pairs(galaxy10_like, 1.0)
    assert len(pairs) >= round(0.02 * 300)
    imgs = galaxy10_like["images"].astype(float)
    for i, j in pairs:
        # the same galaxy re-rendered: images agree far beyond two random galaxies
        a, b = imgs[i].ravel(), imgs[j].ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.8
        assert galaxy10_like["redshift"][i] == galaxy10_like["redshift"][j]
        assert galaxy10_like["pxscale"][i] == galaxy10_like["pxscale"][j]


def test_deterministic_per_seed_and_worker_count():
    a = synth.generate(12, 48, seed=3)
    b = synth.generate(12, 48, seed=3)
    c = synth.generate(12, 48, seed=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["images"], c["images"])
    done = []
    p = synth.generate(12, 48, seed=3, workers=2, progress=lambda k, n: done.append((k, n)))
    for key in a:
        np.testing.assert_array_equal(a[key], p[key], err_msg=key)
    assert done and done[-1] == (12, 12)
    assert [k for k, _ in done] == sorted(k for k, _ in done)


def test_render_galaxy_shape_and_determinism():
    img = synth.render_galaxy(5, 64, np.random.default_rng(1))
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    np.testing.assert_array_equal(img, synth.render_galaxy(5, 64, np.random.default_rng(1)))
    other = synth.render_galaxy(5, 64, np.random.default_rng(2))
    assert not np.array_equal(img, other)


def test_no_trivial_cue_from_flux_size_or_pixel_scale(balanced):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    imgs, y = balanced["images"], balanced["ans"]
    total = imgs.reshape(len(imgs), -1).astype(float).sum(axis=1)
    size = np.array([_moments(im)[0] for im in imgs])
    X = np.column_stack([np.log(total), np.log(size), balanced["pxscale"]])
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    acc_lr = cross_val_score(lr, X, y, cv=cv).mean()
    acc_tree = cross_val_score(DecisionTreeClassifier(max_depth=3, random_state=0), X, y, cv=cv).mean()
    assert acc_lr < 0.35, acc_lr  # chance is 0.10
    assert acc_tree < 0.35, acc_tree
    # every class about as bright as every other
    mean_total = np.array([total[y == c].mean() for c in range(NUM_CLASSES)])
    assert mean_total.max() / mean_total.min() < 2.0, mean_total


def test_no_class_singled_out_by_flux_or_size(balanced):
    # The mean accuracy above is blunt: one class with a blatant cue (e.g. all loose
    # spirals 2.5x bigger) moves it by only a few points. A one-vs-rest ROC AUC per class
    # and feature catches that (such a cue gives AUC ~0.9; here all lie in ~0.35-0.66).
    from sklearn.metrics import roc_auc_score

    imgs, y = balanced["images"], balanced["ans"]
    total = imgs.reshape(len(imgs), -1).astype(float).sum(axis=1)
    size = np.array([_moments(im)[0] for im in imgs])
    for name, feature in (("total brightness", total), ("size", size)):
        auc = np.array([roc_auc_score(y == c, feature) for c in range(NUM_CLASSES)])
        assert np.all((auc > 0.25) & (auc < 0.75)), (name, auc.round(2))


def test_axis_ratios_follow_the_classes(balanced):
    imgs, y = balanced["images"], balanced["ans"]
    q = np.array([_moments(im)[1] for im in imgs])
    mean_q = np.array([q[y == c].mean() for c in range(NUM_CLASSES)])
    round_, between, cigar = mean_q[2], mean_q[3], mean_q[4]
    assert cigar < between < round_, mean_q
    assert round_ > 0.8, mean_q
    assert mean_q[8] < 0.4 and mean_q[9] < 0.5, mean_q  # edge-on disks
    assert mean_q[8] < mean_q[9]  # a bulge rounds the isophotes
    # face-on-ish spirals are far rounder than edge-on disks
    assert min(mean_q[5], mean_q[6], mean_q[7]) > 0.55, mean_q


def test_spirals_bluer_than_smooth_galaxies(balanced):
    imgs, y = balanced["images"].astype(float), balanced["ans"]

    # blue minus red over the bright pixels: arms and disks are bluer than ellipticals
    def blueness(im):
        lum = im.mean(-1)
        m = lum > np.percentile(lum, 90)
        return (im[..., 2][m] - im[..., 0][m]).mean()

    b = np.array([blueness(im) for im in imgs])
    assert b[np.isin(y, [6, 7])].mean() > b[np.isin(y, [2, 3])].mean() + 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n must be"),
        (dict(size=8), "size must be"),
        (dict(workers=0), "workers must be"),
        (dict(seed=-1), "seed must be"),
        (dict(class_fractions=[0.1] * 9), "10 entries"),
        (dict(class_fractions=[0.09] * 10), "sum to 1"),
        (dict(class_fractions=[0.2, -0.1] + [0.1125] * 8), "non-negative"),
        (dict(duplicate_fraction=-0.1), "duplicate_fraction"),
    ],
)
def test_generate_rejects_bad_arguments(kwargs, match):
    args = dict(n=4, size=32, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        synth.generate(**args)


def test_render_galaxy_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="label"):
        synth.render_galaxy(10, 32, rng)
    with pytest.raises(ValueError, match="size"):
        synth.render_galaxy(0, 15, rng)
    with pytest.raises(ValueError, match="pxscale"):
        synth.render_galaxy(0, 32, rng, pxscale=-1.0)


def test_sample_sheet_png(tmp_path):
    out = tmp_path / "img" / "sheet.png"
    synth.write_sample_sheet(out, n_per_class=2, size=32, seed=1)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[0] > 500 and img.shape[1] > 200
