"""The README's first command, end to end at toy scale: synth -> shard -> train (2 local
ranks) -> baseline -> explain -> catalog job -> report."""

import json

import h5py
import torch
from PIL import Image

from galcf_hpc.cli import main
from galcf_hpc.data.shards import verify_shards
from galcf_hpc.train.checkpoint import latest_checkpoint
from test_report import assert_images_ok


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    sets = [f"data.source={tmp_path}/syn.h5", f"data.shards={tmp_path}/shards", f"run.out_dir={tmp_path}/run",
            "data.synth.n=200", "data.synth.size=32", "data.synth.workers=1", "data.shard_size=64",
            "data.image_size=16", "model.channels=[8, 16]", "model.z_dim=12", "model.z1_dim=6",
            "model.flow_blocks=2", "model.flow_hidden=16", "train.epochs=2", "train.batch_size=32",
            "train.warmup_steps=2", "train.time_limit_minutes=0"]
    argv = ["demo", "--config", "configs/smoke.yaml", "--baseline-epochs", "2"] + [x for s in sets for x in ("--set", s)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "validity" in out and "report: " in out
    run = tmp_path / "run"
    counts = verify_shards(tmp_path / "shards")
    assert sum(counts.values()) == 200
    ev = json.loads((run / "eval.json").read_text())
    cf = json.loads((run / "counterfactuals.json").read_text())
    assert cf["num_galaxies"] == counts["test"] and cf["overall"]["n"] == 9 * counts["test"]
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["num_galaxies"] == counts["val"]
    # trained by 2 local ranks with the smoke config's global batch
    state = torch.load(latest_checkpoint(run), weights_only=True)
    assert state["world_size"] == 2 and state["config"]["train"]["global_batch"] == 32
    assert state["config"]["train"]["batch_size"] == 16
    # baseline, catalog job on the test split, report
    base = json.loads((run / "baseline" / "eval.json").read_text())
    assert base["settings"]["epochs"] == 2 and base["splits"]["test"]["num_galaxies"] == counts["test"]
    with h5py.File(run / "catalog" / "catalog.h5", "r") as f:
        assert len(f["pred"]) == counts["test"]
    rep = json.loads((run / "report" / "report.json").read_text())
    assert rep["catalog"]["num_galaxies"] == counts["test"] and rep["baseline"]["available"]
    assert rep["num_galaxies"] == counts["test"] and 0.0 <= rep["counterfactuals"]["overall"]["validity_independent"] <= 1.0
    assert abs(rep["classification"]["model"]["accuracy"] - cf["accuracy"]) < 1e-9
    html = run / "report" / "report.html"
    srcs = assert_images_ok(html)
    assert "counterfactual_grid.png" in srcs and "tsne.png" in srcs
    # a second run reuses catalog, shards, the finished run, baseline and catalog instead of redoing them
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "syn.h5", run / "baseline" / "model.pt",
                                                run / "catalog" / "catalog.h5")}
    assert main(argv) == 0
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    assert Image.open(run / "report" / "tsne.png").format == "PNG"
