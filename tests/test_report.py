"""The report of a tiny trained run: numbers consistent with an independent recomputation,
every referenced image a real PNG, and (where Chromium exists) a rendered page."""

import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from galcf_hpc.baseline import load_baseline, predict, train_baseline
from galcf_hpc.cli import main
from galcf_hpc.data.classes import CLASS_NAMES, NUM_CLASSES
from galcf_hpc.errors import CheckpointError
from galcf_hpc.explain.run import load_run
from galcf_hpc.loaders import build_loader
from galcf_hpc.report import build_report
from galcf_hpc.train.loop import train
from test_train import tiny_config

CHROMIUM = "/usr/bin/chromium"


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.scripts, self.links = [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src"))
        if tag == "script":
            self.scripts += 1
        if tag == "link" and a.get("href"):
            self.links.append(a["href"])


def image_sources(html_path):
    p = _Imgs()
    p.feed(Path(html_path).read_text())
    return p


def assert_images_ok(html_path):
    """Every <img src> is a relative path to an existing, decodable PNG; no scripts or remote links."""
    p = image_sources(html_path)
    assert p.srcs, "the report shows no images"
    assert p.scripts == 0 and not p.links
    for src in p.srcs:
        assert src and not re.match(r"^[a-z]+:", src) and not src.startswith("/"), src
        path = Path(html_path).parent / src
        assert path.is_file(), f"{src} referenced but missing"
        with Image.open(path) as im:
            assert im.format == "PNG"
            im.load()
            assert im.size[0] > 50 and im.size[1] > 50
    return p.srcs


@pytest.fixture(scope="module")
def run_with_baseline(sharded, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "run"
    cfg = tiny_config(sharded.out, out)
    train(cfg)
    base = train_baseline(cfg, epochs=2, lr=3e-3)
    return cfg, out, base


def _recompute(cfg, out):
    """Independent validity and model accuracy, recomputed galaxy by galaxy from the saved models."""
    model, _, _ = load_run(out)
    baseline, _ = load_baseline(out / "baseline" / "model.pt")
    loader = build_loader(cfg, cfg.explain.split, 0, 1, train=False)
    ok = n = correct = total = 0
    per_galaxy = []
    with torch.no_grad():
        for batch in loader:
            keep = batch["valid"]
            for img, label in zip(batch["images"][keep], batch["labels"][keep]):
                x = img[None]
                pred, _, h, z = model.classify(x)
                correct += int(pred.item() == label.item())
                total += 1
                row = []
                for t in range(NUM_CLASSES):
                    if t == pred.item():
                        row.append(-1)
                        continue
                    target = torch.tensor([t])
                    x_cf, _ = model.counterfactual(z, h, pred, target, cfg.explain.margin)
                    v = int(predict(baseline, x_cf).item() == t)
                    row.append(v)
                    ok += v
                    n += 1
                per_galaxy.append(row)
    loader.close()
    return ok / n, n, correct / total, np.array(per_galaxy)


def test_report_numbers_and_images(run_with_baseline, tmp_path):
    cfg, out, base = run_with_baseline
    assert main(["report", "--run", str(out)]) == 0
    rep = json.loads((out / "report" / "report.json").read_text())
    n_test = json.loads((Path(cfg.data.shards) / "test" / "manifest.json").read_text())["num_samples"]
    assert rep["num_galaxies"] == n_test and rep["baseline"]["available"] and rep["baseline"]["note"] is None
    o = rep["counterfactuals"]["overall"]
    assert 0.0 <= o["validity_independent"] <= 1.0 and 0.0 <= o["validity_model"] <= 1.0
    indep, n_cf, acc, rows = _recompute(cfg, out)
    assert o["n"] == n_cf == sum(v["n"] for v in rep["counterfactuals"]["per_target"].values())
    assert abs(o["validity_independent"] - indep) < 1e-9
    assert abs(rep["classification"]["model"]["accuracy"] - acc) < 1e-9
    # the per-galaxy record agrees with the recomputation, galaxy by galaxy
    npz = np.load(out / "report" / "galaxies.npz")
    assert (npz["validity_independent"] == rows).all()
    # the baseline's accuracy in the report is the one it reports itself on that split
    assert abs(rep["classification"]["baseline"]["accuracy"] - base["splits"][cfg.explain.split]["accuracy"]) < 1e-9
    for name in ("z1", "h", "z2"):
        s = rep["silhouette"][name]
        assert -1.0 <= s["original"] <= 1.0 and -1.0 <= s["tsne"] <= 1.0
    assert rep["silhouette"]["h"]["dim"] == rep["silhouette"]["z1"]["dim"] == cfg.model.z1_dim
    assert rep["h_separates_better_than_z2"] == (rep["silhouette"]["h"]["original"] > rep["silhouette"]["z2"]["original"])
    far = [r["min_distance"] for r in rep["outliers"]["far"]]
    assert far == sorted(far, reverse=True) and far[0] >= npz["distance"].min(1).max() - 1e-6
    html_path = out / "report" / "report.html"
    srcs = assert_images_ok(html_path)
    assert {"counterfactual_grid.png", "saliency_grid.png", "tsne.png", "confusion.png",
            "training_curves.png"} <= set(srcs)
    text = html_path.read_text()
    assert f"{o['validity_independent']:.3f}" in text and f"{rep['silhouette']['h']['original']:.3f}" in text
    # --out elsewhere: PNGs next to that file, still referenced relatively
    other = tmp_path / "elsewhere" / "r.html"
    assert main(["report", "--run", str(out), "--out", str(other), "--no-tsne"]) == 0
    assert_images_ok(other)


def test_report_without_baseline_says_so(sharded, tmp_path, capsys):
    cfg = tiny_config(sharded.out, tmp_path / "run", epochs=1)
    train(cfg)
    assert main(["report", "--run", str(tmp_path / "run"), "--no-tsne"]) == 0
    printed = capsys.readouterr().out
    assert "galcf-hpc baseline train --config" in printed
    rep = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert rep["baseline"]["available"] is False and rep["counterfactuals"]["overall"]["validity_independent"] is None
    assert "baseline train" in (tmp_path / "run" / "report" / "report.html").read_text()
    assert rep["silhouette"]["h"]["tsne"] is None and rep["silhouette"]["h"]["original"] is not None


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", "--run", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable baseline"):
        load_baseline(bad)


def test_baseline_checkpoint_is_plain(run_with_baseline):
    cfg, out, base = run_with_baseline
    state = torch.load(out / "baseline" / "model.pt", weights_only=True)
    assert state["format"] == "galcf-hpc-baseline/1" and isinstance(state["model"], dict)
    ev = json.loads((out / "baseline" / "eval.json").read_text())
    assert ev["settings"]["epochs"] == 2 and ev["settings"]["lr"] == 3e-3
    cm = np.array(ev["confusion_matrix"])
    assert cm.shape == (NUM_CLASSES, NUM_CLASSES) and abs(np.trace(cm) / cm.sum() - ev["accuracy"]) < 1e-9
    assert set(ev["per_class_accuracy"]) == set(CLASS_NAMES) and 0.0 <= ev["macro_f1"] <= 1.0


def png_is_blank(path):
    a = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    return a.std() < 1.0


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed")
def test_report_renders_in_headless_chromium(run_with_baseline, tmp_path):
    cfg, out, _ = run_with_baseline
    html_path = out / "report" / "report.html"
    if not html_path.exists():
        build_report(out, tsne=False)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,3000",
           html_path.resolve().as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    assert shot.is_file()
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1400, 3000)
    assert not png_is_blank(shot)
