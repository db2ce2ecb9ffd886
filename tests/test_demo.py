"""The README's first command, end to end at toy scale: synth -> shard -> train -> explain."""

import json

from galcf_hpc.cli import main
from galcf_hpc.data.shards import verify_shards


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    sets = [f"data.source={tmp_path}/syn.h5", f"data.shards={tmp_path}/shards", f"run.out_dir={tmp_path}/run",
            "data.synth.n=200", "data.synth.size=32", "data.synth.workers=1", "data.shard_size=64",
            "data.image_size=16", "model.channels=[8, 16]", "model.z_dim=12", "model.z1_dim=6",
            "model.flow_blocks=2", "model.flow_hidden=16", "train.epochs=2", "train.batch_size=32",
            "train.warmup_steps=2", "train.time_limit_minutes=0"]
    argv = ["demo", "--config", "configs/smoke.yaml"] + [x for s in sets for x in ("--set", s)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "validity" in out
    counts = verify_shards(tmp_path / "shards")
    assert sum(counts.values()) == 200
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    cf = json.loads((tmp_path / "run" / "counterfactuals.json").read_text())
    assert cf["num_galaxies"] == counts["test"] and cf["overall"]["n"] == 9 * counts["test"]
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["num_galaxies"] == counts["val"]
    # a second run reuses catalog, shards and the finished run instead of redoing them
    mtime = (tmp_path / "syn.h5").stat().st_mtime_ns
    assert main(argv) == 0
    assert (tmp_path / "syn.h5").stat().st_mtime_ns == mtime
