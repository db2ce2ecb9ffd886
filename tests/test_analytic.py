"""The analytic renderer (data/analytic.py: numpy models sharing no code with the GalSim
generator) and `galcf-hpc judges check` (the panel and the model on a catalog they never saw):
determinism, shapes, class geometry measured on the images, the astroNN round trip, and
check numbers that equal a recomputation by hand."""

import ast
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from galcf_hpc import cli
from galcf_hpc.data.analytic import FIELD_ARCSEC, render_catalog, render_galaxy
from galcf_hpc.data.classes import CLASS_NAMES, NUM_CLASSES, class_index
from galcf_hpc.data.galaxy10 import open_catalog, write_catalog
from galcf_hpc.errors import CheckpointError, DataError
from galcf_hpc.explain.run import load_run
from galcf_hpc.judges.nets import load_judge
from galcf_hpc.loaders.augment import augment_batch
from test_catalog import run_dir  # noqa: F401 - fixture: a tiny trained run with two tiny judges

ANALYTIC = Path(__file__).resolve().parent.parent / "galcf_hpc" / "data" / "analytic.py"


def test_renderer_is_independent_of_the_galsim_generator():
    imported = set()
    for node in ast.walk(ast.parse(ANALYTIC.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
    assert imported == {"math", "functools", "numpy", ".classes"}, imported


def test_deterministic_shapes_and_dtypes():
    a = render_catalog(30, 32, seed=3, class_fractions=[1] * NUM_CLASSES)
    b = render_catalog(30, 32, seed=3, class_fractions=[1] * NUM_CLASSES)
    c = render_catalog(30, 32, seed=4, class_fractions=[1] * NUM_CLASSES)
    assert set(a) == {"images", "ans", "ra", "dec", "redshift", "pxscale"}
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["images"], c["images"])
    assert a["images"].shape == (30, 32, 32, 3) and a["images"].dtype == np.uint8
    assert a["ans"].shape == (30,) and a["ans"].dtype == np.uint8
    assert np.bincount(a["ans"], minlength=NUM_CLASSES).tolist() == [3] * NUM_CLASSES
    for key in ("ra", "dec", "redshift", "pxscale"):
        assert a[key].shape == (30,) and a[key].dtype == np.float64
    assert np.allclose(a["pxscale"], FIELD_ARCSEC / 32) and np.all(np.abs(a["dec"]) <= 90)
    # galaxies are not blank and not saturated everywhere
    assert 5 < a["images"].mean() < 120 and a["images"].max() > 150
    # default fractions: Galaxy10's, so Round Smooth outnumbers Cigar Shaped Smooth
    counts = np.bincount(render_catalog(200, 16, seed=0)["ans"], minlength=NUM_CLASSES)
    assert counts.sum() == 200 and counts[class_index("Round Smooth")] > 5 * counts[class_index("Cigar Shaped Smooth")]
    with pytest.raises(ValueError, match="class_fractions"):
        render_catalog(5, 32, 0, class_fractions=[1, 2])


def _axis_ratio(image):
    """Second-moment axis ratio of the pixels above 3 sigma of the sky."""
    lum = image.astype(np.float64).mean(-1)
    border = np.concatenate([lum[:4].ravel(), lum[-4:].ravel(), lum[:, :4].ravel(), lum[:, -4:].ravel()])
    sky = np.median(border)
    sigma = 1.4826 * np.median(np.abs(border - sky))
    w = np.clip(lum - sky - 3 * sigma, 0, None)
    yy, xx = np.mgrid[: lum.shape[0], : lum.shape[1]]
    m = w.sum()
    cx, cy = (w * xx).sum() / m, (w * yy).sum() / m
    cov = [
        [(w * (xx - cx) ** 2).sum() / m, (w * (xx - cx) * (yy - cy)).sum() / m],
        [(w * (xx - cx) * (yy - cy)).sum() / m, (w * (yy - cy) ** 2).sum() / m],
    ]
    small, large = np.linalg.eigvalsh(cov)
    return float(np.sqrt(small / large))


def _red_minus_blue(image):
    x = image.astype(np.float64)
    bright = x.mean(-1) > np.percentile(x.mean(-1), 95)
    return float((x[..., 0] - x[..., 2])[bright].mean())


def test_class_geometry_and_colour_are_measurable():
    n = 30
    images = {name: [render_galaxy(class_index(name), 64, 11, i)[0] for i in range(n)] for name in CLASS_NAMES}
    q = {name: np.mean([_axis_ratio(im) for im in ims]) for name, ims in images.items()}
    assert q["Round Smooth"] > 0.8
    assert q["Round Smooth"] > q["In-between Round Smooth"] + 0.1 > q["Cigar Shaped Smooth"] + 0.2
    assert q["Cigar Shaped Smooth"] < 0.6 * q["Round Smooth"]
    assert q["Edge-on without Bulge"] < 0.45 * q["Round Smooth"]
    assert q["Edge-on with Bulge"] < 0.5 * q["Round Smooth"]
    # bulge-dominated galaxies are redder than loose spirals with their blue arms and knots
    red = {name: np.mean([_red_minus_blue(im) for im in images[name]]) for name in CLASS_NAMES}
    assert red["Round Smooth"] > red["Unbarred Loose Spiral"] + 10


def test_round_trip_through_the_astronn_format(tmp_path):
    cat = render_catalog(25, 48, seed=5)
    path = tmp_path / "analytic.h5"
    write_catalog(path, **cat, attrs={"generator": "analytic test", "seed": 5})
    with open_catalog(path) as f:
        assert (f.n, f.image_size) == (25, 48)
        assert np.array_equal(f.read_images(np.arange(25)), cat["images"])
        assert np.array_equal(f.labels, cat["ans"].astype(np.int64))
        for key in ("ra", "dec", "redshift", "pxscale"):
            assert np.array_equal(getattr(f, key), cat[key]), key
        assert f.attrs["generator"] == "analytic test"


def test_data_synth_renderer_analytic(tmp_path, capsys):
    out = tmp_path / "a.h5"
    code = cli.main(
        ["data", "synth", "--renderer", "analytic", "--out", str(out), "--n", "20", "--size", "32", "--seed", "2"]
    )
    assert code == 0 and "analytic renderer" in capsys.readouterr().out
    expected = render_catalog(20, 32, 2)
    with h5py.File(out, "r") as f:
        assert np.array_equal(f["images"][()], expected["images"])
        assert np.array_equal(f["ans"][()], expected["ans"])
        assert "analytic" in f.attrs["generator"] and f.attrs["renderer"] == "analytic"


@pytest.fixture(scope="module")
def analytic_h5(tmp_path_factory):
    path = tmp_path_factory.mktemp("analytic") / "analytic_test.h5"
    write_catalog(path, **render_catalog(60, 32, seed=9), attrs={"generator": "analytic test"})
    return path


@torch.no_grad()
def _accuracy_by_hand(path, classify, image_size, crop_fraction):
    with h5py.File(path, "r") as f:
        images, labels = torch.from_numpy(f["images"][()]), torch.from_numpy(f["ans"][()]).long()
    pred = classify(augment_batch(images, image_size, crop_fraction))
    return float((pred == labels).double().mean())


def test_judges_check_equals_recomputation(run_dir, analytic_h5, capsys):  # noqa: F811
    config = run_dir / "config.yaml"
    assert cli.main(["judges", "check", "--config", str(config), "--data", str(analytic_h5), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    out = run_dir / "judges" / "check-analytic_test.json"
    summary = json.loads(out.read_text())
    assert str(out) in printed and "macro-F1" in printed and "Cigar Shaped Smooth" in printed
    assert summary["num_galaxies"] == 60 and summary["judge_names"] == ["cnn", "resnet_grey"]
    assert set(summary["classifiers"]) == {"cnn", "resnet_grey", "model"}
    model, cfg, _ = load_run(run_dir)
    for name in ("cnn", "resnet_grey"):
        judge, _ = load_judge(run_dir / "judges" / name / "model.pt")
        r = summary["classifiers"][name]
        by_hand = _accuracy_by_hand(
            analytic_h5, lambda x, j=judge: j(x).argmax(1), cfg.data.image_size, cfg.data.crop_fraction
        )
        assert r["kind"] == "judge" and abs(r["accuracy"] - by_hand) < 1e-12, name
        cm = np.array(r["confusion_matrix"])
        assert cm.sum() == 60 and abs(np.trace(cm) / 60 - r["accuracy"]) < 1e-12
        assert set(r["per_class_accuracy"]) == set(CLASS_NAMES) and 0 <= r["macro_f1"] <= 1
    by_hand = _accuracy_by_hand(
        analytic_h5, lambda x: model.classify(x).pred, cfg.data.image_size, cfg.data.crop_fraction
    )
    assert summary["classifiers"]["model"]["kind"] == "model"
    assert abs(summary["classifiers"]["model"]["accuracy"] - by_hand) < 1e-12


def test_judges_check_on_their_own_training_catalog(run_dir, sharded, tmp_path):  # noqa: F811
    """The judges of the fixture were fitted on the evaluation transform of this very
    catalog: the check must preprocess the same way to find them accurate."""
    out = tmp_path / "own.json"
    args = ["judges", "check", "--config", str(run_dir / "config.yaml"), "--data", str(sharded.catalog.path)]
    assert cli.main(args + ["--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["num_galaxies"] == len(sharded.catalog.labels)
    assert summary["classifiers"]["cnn"]["accuracy"] > 0.5


def test_judges_check_errors_name_the_file(run_dir, analytic_h5, tmp_path, capsys):  # noqa: F811
    config = str(run_dir / "config.yaml")
    empty = tmp_path / "empty_run"
    args = ["judges", "check", "--config", config, "--set", f"run.out_dir={empty}", "--data", str(analytic_h5)]
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == CheckpointError.exit_code and str(empty / "judges") in err and "judges train" in err

    unlabelled = tmp_path / "unlabelled.h5"
    cat = render_catalog(4, 32, seed=1)
    write_catalog(unlabelled, cat["images"], None, cat["ra"], cat["dec"])
    assert cli.main(["judges", "check", "--config", config, "--data", str(unlabelled)]) == DataError.exit_code
    err = capsys.readouterr().err
    assert str(unlabelled) in err and "labels" in err

    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not an hdf5 file")
    assert cli.main(["judges", "check", "--config", config, "--data", str(broken)]) == DataError.exit_code
    assert str(broken) in capsys.readouterr().err
