"""benchmarks/gpu_check.py (scripts/gpu_check.sh): the dry run, the no-GPU exit, and the
report writers on a fake results dict. Nothing is measured here (that needs a GPU)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
NAMES = ("dali_decode", "train_throughput", "bf16_vs_fp32", "deepspeed_zero1", "catalog")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = _module()


def _run(*args, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, **env},
        timeout=120,
    )


def test_dry_run_lists_the_five_checks_with_budgets(tmp_path):
    done = _run("--dry-run", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    for name in NAMES:
        assert name in done.stdout
    assert [c.name for c in gpu_check.CHECKS] == list(NAMES)
    assert "budget" in done.stdout and "setup" in done.stdout
    assert sum(c.budget_s for c in gpu_check.CHECKS) + gpu_check.SETUP.budget_s <= gpu_check.TOTAL_BUDGET_S <= 480
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_without_gpu_exits_2_with_a_message(tmp_path):
    done = _run("--out", str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2
    assert "no CUDA GPU is visible" in done.stderr and "--dry-run" in done.stderr


def test_unknown_check_is_a_usage_error():
    done = _run("--dry-run", "--only", "catalog,nope")
    assert done.returncode == 2 and "nope" in done.stderr


@pytest.mark.parametrize(
    ("help_text", "option", "formats"),
    [
        ("[--format {png,jpg}]", "--format", {"png": "png", "jpeg": "jpg"}),
        ("  --image-format {png,jpeg,jp2}\n", "--image-format", {"png": "png", "jpeg": "jpeg", "jp2": "jp2"}),
        ("--image-format={png,webp}", "--image-format", {"png": "png"}),
        ("no such option", None, {}),
    ],
)
def test_shard_formats_read_from_help(help_text, option, formats):
    assert gpu_check.shard_formats(help_text) == (option, formats)


def fake_results():
    ok = dict(status="ok", reason=None, seconds=12.5, budget_s=70)
    return {
        "schema": gpu_check.SCHEMA,
        "started": "2026-11-30T08:00:00+0000",
        "host": "gpu-node",
        "device": "cuda",
        "wall_s": 301.2,
        "total_budget_s": 480,
        "gpu": {"name": "NVIDIA H200", "memory_gib": 139.8, "capability": "9.0", "driver": "580.159.04"},
        "versions": {
            "torch": "2.11.0+cu130",
            "cuda": "13.0",
            "cudnn": 91300,
            "nccl": "2.27.7",
            "dali": "nvidia-dali-cuda130 2.4.0",
            "deepspeed": "0.19.8",
            "python": "3.12.3",
            "galcf_hpc": "0.9.0",
        },
        "config": {"path": "configs/galaxy10_decals.yaml", "image_size": 256, "vgg": "fixed-seed RANDOM VGG16"},
        "setup": {
            **ok,
            "results": {"galaxies": 600, "size": 256, "renderer": "galsim", "formats": {"png": {}, "jpeg": {}}},
        },
        "checks": {
            "dali_decode": {
                **ok,
                "results": {
                    "formats": {
                        "png": {
                            "images": 480,
                            "max_abs_diff": 0.0031,
                            "mean_abs_diff": 1e-5,
                            "max_abs_diff_torch": 0.004,
                            "images_per_s": {"cpu": 950.0, "gpu": 4100.0},
                            "note": "PNG decodes on the CPU",
                        },
                        "jpeg": {
                            "images": 480,
                            "max_abs_diff": 0.02,
                            "mean_abs_diff": 4e-4,
                            "images_per_s": {"cpu": 1500.0, "gpu": 12000.0},
                        },
                    },
                    "skipped_formats": {"jp2": "not offered by `galcf-hpc data shard --help` (--format)"},
                },
            },
            "train_throughput": {
                **ok,
                "results": {
                    "image_size": 256,
                    "micro_batch": 32,
                    "bf16": True,
                    "backend": "nccl",
                    "world_size": 1,
                    "warmup": 10,
                    "steps": 20,
                    "runs": {
                        "synthetic": {
                            "images_per_s": 400.0,
                            "step_s": 0.08,
                            "data_s": 0.0001,
                            "compute_s": 0.079,
                            "peak_memory_bytes": 20 * 2**30,
                            "ratio_to_synthetic": 1.0,
                        },
                        "DALI-gpu (png)": {
                            "images_per_s": 390.0,
                            "step_s": 0.082,
                            "data_s": 0.002,
                            "compute_s": 0.08,
                            "peak_memory_bytes": 21 * 2**30,
                            "ratio_to_synthetic": 0.975,
                        },
                        "torch (png)": {"skipped": "not run"},
                    },
                },
            },
            "bf16_vs_fp32": {
                **ok,
                "results": {
                    "loss_fp32": 1.2345,
                    "loss_bf16": 1.2351,
                    "rel_diff_loss": 4.9e-4,
                    "grad_rel_diff": 0.012,
                    "grad_cosine": 0.9999,
                    "terms": {"loss": {"fp32": 1.2345, "bf16": 1.2351, "rel_diff": 4.9e-4}},
                },
            },
            "deepspeed_zero1": {
                "status": "skipped",
                "reason": "deepspeed is not installed",
                "results": {},
                "seconds": 3.0,
                "budget_s": 70,
            },
            "catalog": {
                "status": "timeout",
                "reason": "ran past its budget of 60 s",
                "results": {"galaxies": 512, "targets_per_galaxy": 9, "image_size": 256, "galaxies_per_s": 95.5},
                "seconds": 60.0,
                "budget_s": 60,
            },
        },
    }


def test_markdown_report_has_the_documented_fields():
    text = gpu_check.markdown_report(fake_results())
    assert text.startswith("# galcf-hpc GPU check")
    for needle in (
        "NVIDIA H200",
        "torch 2.11.0+cu130",
        "CUDA 13.0",
        "DALI nvidia-dali-cuda130 2.4.0",
        "DeepSpeed 0.19.8",
    ):
        assert needle in text
    assert "| check | status | result | seconds / budget |" in text
    for name in ("setup", *NAMES):
        assert f"| {name} |" in text
    assert "| deepspeed_zero1 | skipped | deepspeed is not installed |" in text
    assert "95.5 galaxies/s" in text and "ran past its budget" in text
    assert "| png | 480 | 0.0031 |" in text and "skipped: not offered" in text  # DALI table, jp2 skipped
    assert "| DALI-gpu (png) | 390 | 0.975 |" in text
    assert "| loss | 1.2345 | 1.2351 |" in text
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.endswith("|")


def test_markdown_report_of_a_sparse_dict_does_not_crash():
    text = gpu_check.markdown_report({"checks": {"catalog": {"status": "failed", "reason": "boom"}}})
    assert "| catalog | failed | boom |" in text


def test_json_written_is_the_results_dict(tmp_path):
    results = fake_results()
    gpu_check.write_outputs(results, tmp_path)
    back = json.loads((tmp_path / "gpu_check.json").read_text())
    assert back == results
    assert set(back["checks"]) == set(NAMES)
    for entry in back["checks"].values():
        assert entry["status"] in gpu_check.STATUSES
        assert {"status", "reason", "results", "seconds", "budget_s"} <= set(entry)
    assert (tmp_path / "gpu_check.md").read_text() == gpu_check.markdown_report(results)


def test_relative_difference():
    assert gpu_check.relative_difference(1.01, 1.0) == pytest.approx(0.01)
    assert gpu_check.relative_difference(0.0, 0.0) == 0.0
