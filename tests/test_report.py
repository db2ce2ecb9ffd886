"""The report of a tiny trained run with a judge panel: validity by the model and by every
judge consistent with an independent recomputation, every referenced image a real PNG, the
files next to --out, a catalog with a missing, damaged or foreign part refused, and (where
Chromium exists) a rendered page."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from galcf_hpc.cli import main
from galcf_hpc.data.classes import CLASS_NAMES, NUM_CLASSES
from galcf_hpc.errors import CheckpointError, DataError, UsageError
from galcf_hpc.explain.run import load_run
from galcf_hpc.judges import load_judge, predict, train_judges
from galcf_hpc.judges.nets import build_judge, save_judge
from galcf_hpc.loaders import build_loader
from galcf_hpc.metrics import luminance_share
from galcf_hpc.report import build_report, summary_lines
from galcf_hpc.report.collect import catalog_summary
from galcf_hpc.train.loop import train
from test_train import tiny_config

CHROMIUM = "/usr/bin/chromium"
PANEL = ["cnn", "resnet", "resnet_grey"]
GRIDS = {"counterfactual_grid.png", "decoded_grid.png", "saliency_grid.png", "colour_grid.png"}


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
def run_with_judges(sharded, tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "run"
    cfg = tiny_config(sharded.out, out)
    train(cfg)
    judges = train_judges(cfg, epochs=1, device="cpu")
    return cfg, out, judges


@torch.no_grad()
def _recompute(cfg, out):
    """Galaxy by galaxy and target by target from the saved model and judges, without the
    shared counterfactual pass: validity [N, T] by the model and each judge (-1 for the
    galaxy's own class), luminance share [N, T], and the classes of the real images."""
    model, _, _ = load_run(out)
    judges = {n: load_judge(out / "judges" / n / "model.pt")[0] for n in PANEL}
    loader = build_loader(cfg, cfg.explain.split, 0, 1, train=False)
    valid = {n: [] for n in ["model", *PANEL, *(f"overlay_{n}" for n in PANEL)]}
    lum, labels, preds = [], [], {n: [] for n in ["model", *PANEL]}
    for batch in loader:
        keep = batch["valid"]
        for img, label in zip(batch["images"][keep], batch["labels"][keep]):
            x = img[None]
            pred, _, h, z = model.classify(x)
            recon = model.decoder(z)
            labels.append(int(label))
            preds["model"].append(int(pred))
            for n, j in judges.items():
                preds[n].append(int(predict(j, x)))
            rows = {n: [] for n in valid}
            lrow = []
            for t in range(NUM_CLASSES):
                if t == int(pred):
                    for n in rows:
                        rows[n].append(-1)
                    lrow.append(np.nan)
                    continue
                x_cf, _ = model.counterfactual(z, h, pred, torch.tensor([t]), cfg.explain.margin, cfg.explain.placement)
                rows["model"].append(int(model.classify(x_cf).pred.item() == t))
                shown = (x + x_cf - recon).clamp(0, 1)  # the grid's image
                for n, j in judges.items():
                    rows[n].append(int(predict(j, x_cf).item() == t))
                    rows[f"overlay_{n}"].append(int(predict(j, shown).item() == t))
                lrow.append(float(luminance_share(x_cf - recon)[0]))
            for n in rows:
                valid[n].append(rows[n])
            lum.append(lrow)
    loader.close()
    return (
        {n: np.array(v) for n, v in valid.items()},
        np.array(lum),
        np.array(labels),
        {n: np.array(p) for n, p in preds.items()},
    )


def _expected(valid, lum, cols=slice(None)):
    """The report's counterfactual numbers from per-galaxy validity (numpy, own class -1)."""
    defined = valid["model"][:, cols] >= 0
    votes = np.stack([valid[n][:, cols] for n in PANEL])  # [J, N, T]
    out = {
        "n": int(defined.sum()),
        **{f"validity_{n}": (valid[n][:, cols] == 1)[defined].mean() for n in ["model", *PANEL]},
    }
    out["validity_panel"] = votes.mean(0)[defined].mean()
    out["panel_all"] = (votes == 1).all(0)[defined].mean()
    out["panel_majority"] = ((votes == 1).mean(0) > 0.5)[defined].mean()
    shown = np.stack([valid[f"overlay_{n}"][:, cols] for n in PANEL])
    out["overlay_validity_panel"] = shown.mean(0)[defined].mean()
    out["luminance_share"] = np.nanmean(lum[:, cols][defined])
    return out


def _assert_numbers(got, want):
    assert got["n"] == want["n"]
    for k, v in want.items():
        assert abs(got[k] - v) < (1e-4 if k == "luminance_share" else 1e-9), (k, got[k], v)


def test_report_numbers_and_images(run_with_judges, tmp_path):
    cfg, out, trained = run_with_judges
    rep = build_report(out)
    assert json.loads((out / "report" / "report.json").read_text()) == rep
    n_test = json.loads((Path(cfg.data.shards) / "test" / "manifest.json").read_text())["num_samples"]
    j = rep["judges"]
    assert rep["num_galaxies"] == n_test and j["names"] == PANEL and j["luminance_only"] == ["resnet_grey"]
    assert j["note"] is None and j["missing"] == []

    # every number per judge is what the saved model and judges give, galaxy by galaxy
    valid, lum, labels, preds = _recompute(cfg, out)
    cf = rep["counterfactuals"]
    _assert_numbers(cf["overall"], _expected(valid, lum))
    for t, name in enumerate(CLASS_NAMES):
        if cf["per_target"][name]["n"]:
            _assert_numbers(cf["per_target"][name], _expected(valid, lum, slice(t, t + 1)))
    npz = np.load(out / "report" / "galaxies.npz")
    for n in ["model", *PANEL]:
        assert npz[f"validity_{n}"].shape == (n_test, NUM_CLASSES)
        assert (npz[f"validity_{n}"] == valid[n]).all(), n
    np.testing.assert_allclose(npz["luminance_share"], lum, atol=1e-4)
    assert abs(rep["classification"]["model"]["accuracy"] - (preds["model"] == labels).mean()) < 1e-9
    for n in PANEL:
        acc = rep["classification"]["judges"][n]["accuracy"]
        assert abs(acc - (preds[n] == labels).mean()) < 1e-9 and (npz[f"pred_{n}"] == preds[n]).all()
        # and it is the accuracy the judge reports itself on that split
        assert abs(acc - trained[n]["accuracy"]) < 1e-9 and rep["judges"]["trained"][n]["eval"]["accuracy"] == acc

    for name in ("z1", "h", "z2"):
        s = rep["silhouette"][name]
        assert -1.0 <= s["original"] <= 1.0 and -1.0 <= s["tsne"] <= 1.0
    assert rep["silhouette"]["h"]["dim"] == rep["silhouette"]["z1"]["dim"] == cfg.model.z1_dim
    far = [r["min_distance"] for r in rep["outliers"]["far"]]
    assert far == sorted(far, reverse=True) and abs(far[0] - npz["distance"].min(1).max()) < 1e-5
    between = [r["margin"] for r in rep["outliers"]["between"]]
    d = np.sort(npz["distance"], 1)
    assert between == sorted(between) and abs(between[0] - (d[:, 1] - d[:, 0]).min()) < 1e-5
    assert set(rep["outliers"]["far"][0]["judges"]) == set(PANEL)

    html_path = out / "report" / "report.html"
    srcs = assert_images_ok(html_path)
    assert GRIDS | {"tsne.png", "confusion.png", "training_curves.png", "validity.png"} <= set(srcs)
    text = html_path.read_text()
    o = cf["overall"]
    for n in PANEL:
        assert n in text and f"{o[f'validity_{n}']:.3f}" in text
    assert f"{o['luminance_share']:.3f}" in text and "luminance share" in text
    assert "resnet_grey sees luminance only" in text and "Trained against" in text and "Judged by" in text
    assert f"{rep['silhouette']['h']['original']:.3f}" in text
    lines = "\n".join(summary_lines(rep))
    assert all(n in lines for n in PANEL) and f"{o['luminance_share']:.3f}" in lines


def _assert_same_json(got, want, where=""):
    """Equal JSON, floats to 1e-7 relative (sums may run in another order with other thread counts)."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            _assert_same_json(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_json(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-7, abs=1e-12, nan_ok=True), where
    else:
        assert got == want, where


def test_report_writes_what_explain_writes_from_its_own_pass(run_with_judges, tmp_path):
    """``build_report(explain=True)`` (the demo's last stage) writes counterfactuals.json and
    the grids from the report's pass: the same JSON as `galcf-hpc explain`; a pass cut short of
    the galaxies explain covers refuses, leaving what explain wrote."""
    from galcf_hpc.errors import UsageError
    from galcf_hpc.explain.run import explain

    cfg, out, _ = run_with_judges
    explained = explain(out, device="cpu")
    path = out / "counterfactuals.json"
    want = json.loads(json.dumps(explained))
    assert json.loads(path.read_text()) == want
    before = path.read_bytes()
    n_test = json.loads((Path(cfg.data.shards) / "test" / "manifest.json").read_text())["num_samples"]
    with pytest.raises(UsageError, match="explain.max_galaxies"):
        build_report(out, out=tmp_path / "cut" / "r.html", max_galaxies=n_test - 1, explain=True, tsne=False)
    assert path.read_bytes() == before
    path.unlink()
    grids = sorted(GRIDS)
    for name in grids:
        (out / name).unlink()
    rep = build_report(out, out=tmp_path / "r" / "r.html", max_galaxies=n_test + 5, explain=True, tsne=False)
    _assert_same_json(json.loads(path.read_text()), want)
    assert all((out / name).is_file() and (tmp_path / "r" / name).is_file() for name in grids)
    _assert_same_json(json.loads(json.dumps(rep["counterfactuals"]["overall"])), want["overall"])


@pytest.mark.parametrize("explained", [5, 12])
def test_demo_report_stage_explains_what_explain_max_galaxies_asks(run_with_judges, explained, monkeypatch):
    """The demo's last stage explains the run's explain.max_galaxies galaxies: in the report's
    own pass when a report can be made of them (>= 10), else in an explain pass of its own
    beside a report of the split."""
    from types import SimpleNamespace

    import galcf_hpc.explain.run as explain_run
    import galcf_hpc.report.build as report_build
    from galcf_hpc import demo
    from galcf_hpc.report.build import MIN_GALAXIES

    cfg, out, _ = run_with_judges
    n_test = json.loads((Path(cfg.data.shards) / "test" / "manifest.json").read_text())["num_samples"]
    assert explained < n_test
    original = explain_run.load_run

    def limited(run_dir, checkpoint=None, device="cpu", overrides=()):  # the run as trained with the limit
        return original(run_dir, checkpoint, device, [*overrides, f"explain.max_galaxies={explained}"])

    monkeypatch.setattr(explain_run, "load_run", limited)
    monkeypatch.setattr(report_build, "load_run", limited)
    state = SimpleNamespace(cfg=cfg, run_dir=out, catalog_dir=None, results={})
    rep = demo.stage_report(state)
    written = json.loads((out / "counterfactuals.json").read_text())
    assert state.results["explain"]["num_galaxies"] == written["num_galaxies"] == explained
    assert rep["num_galaxies"] == (explained if explained >= MIN_GALAXIES else n_test)


def test_report_out_elsewhere_writes_next_to_it(run_with_judges, tmp_path, capsys):
    cfg, out, _ = run_with_judges
    default = out / "report" / "report.json"
    if not default.exists():
        build_report(out, tsne=False)
    before = {p: p.stat().st_mtime_ns for p in (default, out / "report" / "galaxies.npz")}
    other = tmp_path / "elsewhere" / "r.html"
    assert main(["report", "--run", str(out), "--out", str(other), "--max-galaxies", "10", "--no-tsne"]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    rep = json.loads((other.parent / "report.json").read_text())
    assert rep["num_galaxies"] == 10
    printed = capsys.readouterr().out
    assert f"(numbers: {(other.parent / 'report.json').resolve()})" in printed and "resnet_grey" in printed
    assert len(np.load(other.parent / "galaxies.npz")["keys"]) == 10
    assert rep["paths"] == {
        "html": str(other),
        "json": str(other.parent / "report.json"),
        "npz": str(other.parent / "galaxies.npz"),
    }
    assert GRIDS <= set(assert_images_ok(other))


def test_report_without_judges_says_so(sharded, tmp_path, capsys):
    cfg = tiny_config(sharded.out, tmp_path / "run", epochs=1)
    train(cfg)
    capsys.readouterr()
    assert main(["report", "--run", str(tmp_path / "run"), "--no-tsne"]) == 0
    hint = f"galcf-hpc judges train --config {tmp_path / 'run' / 'config.yaml'}"
    assert hint in capsys.readouterr().out
    rep = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert rep["judges"]["names"] == [] and rep["judges"]["missing"] == PANEL and hint in rep["judges"]["note"]
    o = rep["counterfactuals"]["overall"]
    assert o["validity_model"] is not None and "validity_panel" not in o and rep["classification"]["judges"] == {}
    assert hint in (tmp_path / "run" / "report" / "report.html").read_text()
    assert rep["silhouette"]["h"]["tsne"] is None and rep["silhouette"]["h"]["original"] is not None

    # one judge, luminance only: reported, called out, the rest named as missing
    judge = build_judge("resnet", (8, 16), "luminance")
    (tmp_path / "run" / "judges" / "resnet_grey").mkdir(parents=True)
    save_judge(
        tmp_path / "run" / "judges" / "resnet_grey" / "model.pt",
        judge.eval(),
        {"family": "resnet", "channels": [8, 16], "input": "luminance", "num_classes": NUM_CLASSES},
        {},
    )
    rep = build_report(tmp_path / "run", max_galaxies=10, tsne=False)
    assert rep["judges"]["names"] == rep["judges"]["luminance_only"] == ["resnet_grey"]
    assert (
        rep["judges"]["missing"] == ["cnn", "resnet"]
        and 0.0 <= rep["counterfactuals"]["overall"]["validity_resnet_grey"] <= 1.0
    )
    text = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "resnet_grey sees luminance only" in text and "Not trained: cnn, resnet" in text


def _fake_catalog(folder, parts=2, per_part=3, judges=("cnn",), checkpoint_sha256="c" * 64):
    """A catalog.h5 of virtual datasets over part files, shaped like the catalog job's."""
    folder.mkdir(parents=True)
    (folder / "parts").mkdir()
    n, t = parts * per_part, NUM_CLASSES
    rng = np.random.default_rng(0)
    pred = rng.integers(0, NUM_CLASSES, n).astype("i2")
    own = pred[:, None] == np.arange(t)[None]
    cols = {
        "pred": pred,
        "label": pred.copy(),
        "validity": np.where(own, -1, rng.integers(0, 2, (n, t))).astype("i1"),
        **{f"validity_{j}": np.where(own, -1, rng.integers(0, 2, (n, t))).astype("i1") for j in judges},
        "luminance_share": np.where(own, np.nan, rng.uniform(0, 1, (n, t))).astype("f4"),
    }
    for p in range(parts):
        with h5py.File(folder / "parts" / f"unit-{p:06d}.h5", "w") as f:
            for k, v in cols.items():
                f[k] = v[p * per_part : (p + 1) * per_part]
            f.attrs["checkpoint_sha256"] = checkpoint_sha256
    with h5py.File(folder / "catalog.h5", "w") as f:
        for k, v in cols.items():
            layout = h5py.VirtualLayout(v.shape, v.dtype)
            for p in range(parts):
                layout[p * per_part : (p + 1) * per_part] = h5py.VirtualSource(
                    f"parts/unit-{p:06d}.h5", k, shape=(per_part,) + v.shape[1:], dtype=v.dtype
                )
            f.create_virtual_dataset(k, layout, fillvalue=-32768 if k == "pred" else 0)
        f.attrs.update(
            {
                "num_galaxies": n,
                "target_names": list(CLASS_NAMES),
                "judge_names": list(judges),
                "checkpoint_sha256": checkpoint_sha256,
            }
        )
    return cols


def test_catalog_summary_and_missing_part(tmp_path, capsys):
    cols = _fake_catalog(tmp_path / "cat")
    s = catalog_summary(tmp_path / "cat")
    v, vj = cols["validity"], cols["validity_cnn"]
    assert s["num_galaxies"] == 6 and s["judge_names"] == ["cnn"] and s["accuracy"] == 1.0
    assert s["overall"]["n"] == int((v >= 0).sum())
    assert abs(s["overall"]["validity_model"] - (v == 1).sum() / (v >= 0).sum()) < 1e-12
    assert abs(s["overall"]["validity_cnn"] - (vj == 1).sum() / (vj >= 0).sum()) < 1e-12
    assert abs(s["overall"]["luminance_share"] - np.nanmean(cols["luminance_share"])) < 1e-6
    (tmp_path / "cat" / "parts" / "unit-000001.h5").unlink()
    with pytest.raises(DataError, match=r"1 part file\(s\).*missing.*unit-000001.h5.*catalog verify"):
        catalog_summary(tmp_path / "cat")
    (tmp_path / "run").mkdir()
    assert main(["report", "--run", str(tmp_path / "run"), "--catalog", str(tmp_path / "cat")]) == DataError.exit_code
    assert "missing" in capsys.readouterr().err


def test_catalog_summary_refuses_damaged_foreign_and_incomplete_parts(tmp_path, monkeypatch, capsys):
    """A truncated part (HDF5 raised an OSError that named no file), a part of another
    catalog (counted as if it were this one's), catalog.h5 without an attribute, and a
    missing part read from inside another catalog's directory (HDF5 then finds that
    catalog's part relative to the current directory): each a DataError naming the file."""
    _fake_catalog(tmp_path / "cat", parts=3)
    part = tmp_path / "cat" / "parts" / "unit-000001.h5"
    good = part.read_bytes()
    part.write_bytes(good[:1000])
    with pytest.raises(DataError, match=rf"{re.escape(str(part))} cannot be opened.*catalog verify"):
        catalog_summary(tmp_path / "cat")
    (tmp_path / "run").mkdir()
    assert main(["report", "--run", str(tmp_path / "run"), "--catalog", str(tmp_path / "cat")]) == DataError.exit_code
    err = capsys.readouterr().err
    assert f"{part} cannot be opened" in err and "Traceback" not in err

    _fake_catalog(tmp_path / "other", parts=3, checkpoint_sha256="d" * 64)
    shutil.copy(tmp_path / "other" / "parts" / "unit-000001.h5", part)
    with pytest.raises(
        DataError, match=rf"{re.escape(str(part))} belongs to another catalog: its checkpoint_sha256 'd+'"
    ):
        catalog_summary(tmp_path / "cat")

    part.write_bytes(good)
    assert catalog_summary(tmp_path / "cat")["num_galaxies"] == 9
    with h5py.File(tmp_path / "cat" / "catalog.h5", "a") as f:
        del f.attrs["num_galaxies"]
    with pytest.raises(DataError, match=r"catalog.h5 has no attribute 'num_galaxies'"):
        catalog_summary(tmp_path / "cat")

    _fake_catalog(tmp_path / "cat2", parts=3)
    (tmp_path / "cat2" / "parts" / "unit-000002.h5").unlink()
    monkeypatch.chdir(tmp_path / "other")  # holds a parts/unit-000002.h5 of its own
    with pytest.raises(DataError, match=r"1 part file\(s\).*missing or unusable.*cat2/parts/unit-000002.h5 is missing"):
        catalog_summary(tmp_path / "cat2")


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path / "nope")]) == DataError.exit_code
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", "--run", str(tmp_path / "empty")]) == CheckpointError.exit_code
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["report", "--run", str(tmp_path / "empty"), "--out", str(tmp_path / "r.txt")]) == UsageError.exit_code
    assert ".html" in capsys.readouterr().err
    assert (
        main(["report", "--run", str(tmp_path / "empty"), "--catalog", str(tmp_path / "nocat")]) == DataError.exit_code
    )
    assert "catalog run" in capsys.readouterr().err


def png_is_blank(path):
    a = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    return a.std() < 1.0


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed")
def test_report_renders_in_headless_chromium(run_with_judges, tmp_path):
    cfg, out, _ = run_with_judges
    html_path = out / "report" / "report.html"
    if not html_path.exists():
        build_report(out, tsne=False)
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1400,3000",
        html_path.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    assert shot.is_file()
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1400, 3000)
    assert not png_is_blank(shot)


def test_the_model_is_evaluated_at_the_precision_it_trained_at(run_with_judges, sharded, tmp_path, monkeypatch):
    """With train.cpu_bf16 (on a CPU that computes bf16 natively) the model's encoder and
    decoder run in bf16 wherever the model is evaluated: the epochs' validation, explain,
    report, the catalog's inference context. The judges classify in fp32 all the same (the
    yardstick does not move with the model's precision). Without the key nothing runs in bf16."""
    import galcf_hpc.device as device
    from galcf_hpc.catalog.render import inference_context
    from galcf_hpc.explain.run import explain
    from galcf_hpc.judges.nets import PlainCNN, ResNet
    from galcf_hpc.model.autoencoder import Decoder, Encoder

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    seen = {}

    def record(module, inputs, output):
        kind = "judge" if isinstance(module, (PlainCNN, ResNet)) else type(module).__name__
        if isinstance(module, (Encoder, Decoder, PlainCNN, ResNet)) and not module.training:
            seen.setdefault(kind, set()).add(output.dtype)

    def dtypes(call):
        seen.clear()
        call()
        return seen.copy()

    bf16_cfg = tiny_config(sharded.out, tmp_path / "bf16", cpu_bf16=True, threads=1)
    bf16 = {torch.bfloat16}
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        # validation after every epoch (and the final one)
        assert dtypes(lambda: train(bf16_cfg)) == {"Encoder": bf16, "Decoder": bf16}
        shutil.copytree(run_with_judges[1] / "judges", tmp_path / "bf16" / "judges")
        want = {"Encoder": bf16, "Decoder": bf16, "judge": {torch.float32}}
        assert dtypes(lambda: explain(tmp_path / "bf16", max_galaxies=8, device="cpu")) == want
        # counterfactuals.json and report.json say at which precision their numbers were computed
        assert json.loads((tmp_path / "bf16" / "counterfactuals.json").read_text())["precision"] == "bf16"
        out = tmp_path / "rep" / "report.html"
        assert dtypes(lambda: build_report(tmp_path / "bf16", out=out, max_galaxies=10, device="cpu")) == want
        assert json.loads((out.parent / "report.json").read_text())["precision"] == "bf16"
        assert "the model in bf16 (the judges in fp32)" in out.read_text()
        model, cfg, _ = load_run(tmp_path / "bf16")
        x = torch.rand(4, 3, 16, 16)
        with inference_context(torch.device("cpu"), cfg.train):
            assert model.classify(x).z.dtype == torch.bfloat16
        # the fp32 run of the same kind: nothing in bf16
        fp32 = {torch.float32}
        assert dtypes(lambda: explain(run_with_judges[1], max_galaxies=8, device="cpu")) == {
            "Encoder": fp32,
            "Decoder": fp32,
            "judge": fp32,
        }
        assert json.loads((run_with_judges[1] / "counterfactuals.json").read_text())["precision"] == "fp32"
        model, cfg, _ = load_run(run_with_judges[1])
        with inference_context(torch.device("cpu"), cfg.train):
            assert model.classify(x).z.dtype == torch.float32
    finally:
        hook.remove()
