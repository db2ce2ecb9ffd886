"""The smoke configuration's goals, end to end (about 12 minutes on 2 CPU cores).

Marked slow: run deliberately with `python3 -m pytest -m slow`.
"""

import json

import pytest

from galcf_hpc.cli import main


@pytest.mark.slow
def test_smoke_config_meets_goals(tmp_path):
    sets = [f"data.source={tmp_path}/syn.h5", f"data.shards={tmp_path}/shards", f"run.out_dir={tmp_path}/run"]
    assert main(["demo", "--config", "configs/smoke.yaml"] + [x for s in sets for x in ("--set", s)]) == 0
    cf = json.loads((tmp_path / "run" / "counterfactuals.json").read_text())
    o = cf["overall"]
    assert cf["accuracy"] >= 0.88
    assert o["validity_model"] >= 0.95
    # judges nothing trained against (docs/method.md): well above the 0.29 of the objective
    # without the luminance critic, and the luminance-only judge convinced as often
    assert cf["judge_names"] == ["cnn", "resnet", "resnet_grey"]
    # (0.753 / 0.669 in the demo with cf_symmetry, 0.674 / 0.584 before it)
    assert o["validity_panel"] >= 0.65 and o["validity_resnet_grey"] >= 0.55
    # the change is mostly structure, not colour: 0.82 in the demo of the shipped objective
    # (its SSIM term trades some luminance share for similarity, docs/method.md), 0.90 before
    assert o["luminance_share"] >= 0.7
    # 0.880 in that demo (0.855 with boundary-only training counterfactuals, 0.805 before the SSIM term)
    assert o["ssim_rec"] >= 0.85
    assert o["background_msd"] < o["center_msd"] / 4  # the change sits on the galaxy, not the sky
    # the decoder reconstructs: far better than predicting the mean image
    assert cf["reconstruction"]["msd"] < 0.006
