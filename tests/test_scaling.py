"""Scaling studies: jobs/scaling.sbatch, unmodified, under the real local Slurm (1 and 2
ranks, CPU/gloo, tiny model, synthetic loader) -> results.jsonl -> `scaling analyze`; the
projection model against known values; the sweep script as a dry run; input errors."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from galcf_hpc.errors import DataError, GalcfError
from galcf_hpc.scaling import projection as P
from galcf_hpc.scaling.analyze import analyze, load_results
from slurm import REPO, slurm  # noqa: F401  (slurm: the fixture)
from test_train import tiny_config


def _submit(slurm, config, ntasks, tmp, results):
    args = ["--mode", "weak", "--engine", "ddp", "--loader", "synthetic", "--steps", "4", "--warmup", "1"]
    return slurm.sbatch(
        [
            "--account=test",
            "--nodes=1",
            f"--ntasks-per-node={ntasks}",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={tmp}/slurm-%j.out",
            "jobs/scaling.sbatch",
            config,
            *args,
            "--repeats",
            "2",
            "--out",
            results,
        ],
        timeout=240,
    )


@pytest.fixture(scope="module")
def measured(slurm, sharded, tmp_path_factory):
    """Two runs of jobs/scaling.sbatch (1 and 2 tasks) appending to one results file."""
    tmp = tmp_path_factory.mktemp("scaling")
    config = tmp / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(tiny_config(sharded.out, tmp / "run", loader="synthetic", threads=1).to_dict(), sort_keys=False)
    )
    results = tmp / "results.jsonl"
    logs = []
    for ntasks in (1, 2):
        # jobs/scaling.sbatch is not requeued: a point whose rank died in native code
        # ("terminate called", gloo's threads, not this package) is submitted once more,
        # as jobs/scaling.sbatch tells users to do; a second failure fails the test.
        # A rank that dies at teardown may do so after rank 0 appended its record: the
        # record of a failed attempt is dropped before the retry (`scaling analyze` would let
        # the later line win; these tests read the file line by line).
        before = results.read_bytes() if results.exists() else b""
        for attempt in (1, 2):
            job, rc = _submit(slurm, config, ntasks, tmp, results)
            text = (tmp / f"slurm-{job}.out").read_text()
            if rc == 0 or attempt == 2 or "terminate called" not in text:
                break
            results.write_bytes(before)
        assert rc == 0 and slurm.job_state(job).exit_code == "0:0", text
        logs.append(text)
    return tmp, results, logs


def test_sbatch_runs_append_one_record_each(measured):
    tmp, results, logs = measured
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["world_size"] for r in records] == [1, 2]
    for r, log in zip(records, logs):
        assert r["launcher"] == "srun" and r["nodes"] == 1 and r["slurm_job_id"]
        assert r["micro_batch"] == 16 and r["global_batch"] == 16 * r["world_size"]
        assert r["images_per_s"] > 0 and len(r["images_per_s_repeats"]) == 2
        assert r["compute_s"] > 0 and r["data_s"] >= 0 and 0 <= r["data_share"] < 1
        assert r["peak_memory_bytes"] > 0 and r["parameters"] > 0 and r["grad_bytes"] == 4 * r["parameters"]
        assert r["versions"]["torch"] and r["versions"]["python"] and r["devices"][0].startswith("CPU")
        assert f"galcf-hpc scaling: {r['world_size']} tasks on 1 node(s)" in log
    one, two = records
    assert one["allreduce_bench"] == [] and one["backend"] is None
    assert two["backend"] == "gloo" and two["allreduce_grad_s"] > 0
    assert two["grad_bytes"] in [b["bytes"] for b in two["allreduce_bench"]]
    assert one["compute_nosync_s"] is None and two["compute_nosync_s"] > 0
    assert two["comm_exposed_s"] is not None and two["comm_bandwidth_Bps"] > 0 and two["comm_latency_s"] > 0


def test_analyze_tables_and_plots(measured):
    tmp, results, _ = measured
    one, two = [json.loads(line) for line in results.read_text().splitlines()]
    out = tmp / "analysis"
    done = subprocess.run(
        [sys.executable, "-m", "galcf_hpc.cli", "scaling", "analyze", str(results), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    for name in (
        "scaling.md",
        "scaling.csv",
        "scaling_throughput.png",
        "scaling_efficiency.png",
        "scaling_data_share.png",
    ):
        assert (out / name).stat().st_size > 0
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "scaling.csv")))
    assert [int(r["gpus"]) for r in rows] == [1, 2]
    expected = two["images_per_s"] / (2 * one["images_per_s"])
    assert float(rows[0]["efficiency"]) == pytest.approx(1.0)
    assert float(rows[1]["efficiency"]) == pytest.approx(expected, rel=1e-9)
    md = (out / "scaling.md").read_text()
    assert f"| {expected:.3f} |" in md and "| weak | ddp | synthetic | 2 | 1 |" in md


def test_project_from_measured_results_reports_two_rank_check(measured):
    tmp, results, _ = measured
    one, two = [json.loads(line) for line in results.read_text().splitlines()]
    out = tmp / "projection"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "galcf_hpc.cli",
            "scaling",
            "project",
            "--from",
            str(results),
            "--nodes",
            "1",
            "2",
            "4",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "projection.json").read_text())
    assert data["base"]["compute_s"] == one["compute_s"] and data["base"]["assumed"] is False
    assert [r["gpus"] for r in data["rows"] if r["mode"] == "weak"] == [1, 4, 8, 16]
    check = data["validation"][0]
    assert check["images_per_s_2_measured"] == two["images_per_s"]
    assert check["rel_error_images_per_s"] == pytest.approx(
        (check["images_per_s_2_pred"] - two["images_per_s"]) / two["images_per_s"]
    )
    assert "Check against the measured 2-rank run" in (out / "projection.md").read_text()
    assert (out / "projection.png").read_bytes()[:4] == b"\x89PNG"


# -- projection model -------------------------------------------------------------------------


def test_ring_allreduce_known_values():
    assert P.ring_allreduce_time(1e9, 1, 25e9, 5e-6) == 0.0
    # 2 (p-1)/p S/B + 2 (p-1) alpha
    assert P.ring_allreduce_time(1e9, 2, 25e9, 5e-6) == pytest.approx(1e9 / 25e9 + 2 * 5e-6)
    assert P.ring_allreduce_time(100e6, 8, 25e9, 5e-6) == pytest.approx(2 * 7 / 8 * 100e6 / 25e9 + 14 * 5e-6)
    m = P.JURECA_DC
    assert P.allreduce_time(100e6, 4, m) == pytest.approx(2 * 3 / 4 * 100e6 / 200e9 + 6 * 2e-6)  # NVLink
    assert P.allreduce_time(100e6, 8, m) == pytest.approx(2 * 7 / 8 * 100e6 / 25e9 + 14 * 5e-6)  # IB
    with pytest.raises(ValueError):
        P.ring_allreduce_time(1.0, 0, 1.0, 0.0)


def test_projection_efficiency_trends():
    rows = P.project(0.05, 32, 4 * 100e6, nodes=(1, 2, 4, 8, 16, 32, 64), global_batch=4096)
    weak = [r for r in rows if r["mode"] == "weak"]
    strong = [r for r in rows if r["mode"] == "strong"]
    assert weak[0]["gpus"] == 1 and weak[0]["efficiency"] == pytest.approx(1.0)
    assert strong[0]["gpus"] == 1 and strong[0]["efficiency"] == pytest.approx(1.0)
    eff = [r["efficiency"] for r in weak]
    assert all(a >= b - 1e-12 for a, b in zip(eff, eff[1:])) and eff[-1] < 1
    times = [r["step_s"] for r in strong]
    assert [r["gpus"] for r in strong] == [1, 4, 8, 16, 32, 64, 128, 256]
    assert all(a > b for a, b in zip(times, times[1:]))
    assert all(r["global_batch"] == 4096 and r["micro_batch"] * r["gpus"] == 4096 for r in strong)
    assert all(r["images_per_s"] == pytest.approx(r["global_batch"] / r["step_s"]) for r in rows)


def test_full_overlap_hides_small_communication():
    machine = P.Machine(overlap=1.0)
    rows = P.project(10.0, 32, 4 * 1e6, nodes=(1, 64), machine=machine)  # 10 s compute, 4 MB of gradients
    assert all(r["efficiency"] == pytest.approx(1.0, abs=1e-6) for r in rows if r["mode"] == "weak")
    no_overlap = P.project(10.0, 32, 4 * 1e6, nodes=(64,), machine=P.Machine(overlap=0.0))
    assert no_overlap[-1]["efficiency"] < 1.0
    assert P.exposed_comm(1.0, 3.0, 0.5, 2 / 3) == pytest.approx(0.0)
    assert P.exposed_comm(2.0, 3.0, 0.5, 2 / 3) == pytest.approx(1.0)


def test_validate_two_rank_prediction():
    one = {
        "world_size": 1,
        "micro_batch": 32,
        "global_batch": 32,
        "step_s": 0.2,
        "compute_s": 0.2,
        "images_per_s": 160.0,
    }
    two = {
        "world_size": 2,
        "micro_batch": 32,
        "global_batch": 64,
        "step_s": 0.25,
        "images_per_s": 256.0,
        "grad_bytes": 4e6,
        "comm_bandwidth_Bps": 1e8,
        "comm_latency_s": 1e-3,
        "allreduce_grad_s": 0.04,
    }
    v = P.validate_two_rank(one, two, overlap=0.0)
    t_ar = 4e6 / 1e8 + 2e-3
    assert v["allreduce_pred_s"] == pytest.approx(t_ar)
    assert v["images_per_s_2_pred"] == pytest.approx(64 / (0.2 + t_ar))
    assert v["rel_error_images_per_s"] == pytest.approx((64 / (0.2 + t_ar) - 256) / 256)
    assert v["efficiency_measured"] == pytest.approx(0.8)


def test_project_with_assumed_step_time(tmp_path):
    out = tmp_path / "p"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "galcf_hpc.cli",
            "scaling",
            "project",
            "--config",
            "configs/smoke.yaml",
            "--step-time",
            "0.1",
            "--nodes",
            "1",
            "2",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    md = (out / "projection.md").read_text()
    assert "ASSUMED step time 100.0 ms/step (not measured)" in md
    base = json.loads((out / "projection.json").read_text())["base"]
    assert base["assumed"] and base["grad_bytes"] == 4 * base["parameters"]


# -- input errors, sweep script ----------------------------------------------------------------


def test_load_results_errors_name_file_and_line(tmp_path):
    with pytest.raises(GalcfError, match="not found"):
        load_results([tmp_path / "missing.jsonl"])
    good = {
        "kind": "scaling",
        "mode": "weak",
        "engine": "ddp",
        "loader": "synthetic",
        "world_size": 1,
        "nodes": 1,
        "micro_batch": 4,
        "global_batch": 4,
        "images_per_s": 10.0,
        "images_per_s_min": 9.0,
        "images_per_s_max": 11.0,
        "step_s": 0.4,
        "data_s": 0.1,
        "compute_s": 0.3,
    }
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + '{"kind": "scaling", "mode"\n')
    with pytest.raises(GalcfError, match=rf"{path}:3: not a JSON line"):
        load_results([path])
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "compute_s"}) + "\n")
    with pytest.raises(GalcfError, match=rf"{path}:1: record lacks compute_s"):
        load_results([path])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "galcf_hpc.cli",
            "scaling",
            "analyze",
            str(tmp_path / "none.jsonl"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == DataError.exit_code and "none.jsonl not found" in done.stderr


def test_strong_efficiency_from_global_batch_time(tmp_path):
    base = {
        "kind": "scaling",
        "mode": "strong",
        "engine": "ddp",
        "loader": "torch",
        "nodes": 1,
        "images_per_s_min": 1.0,
        "images_per_s_max": 1.0,
        "data_s": 0.0,
        "compute_s": 1.0,
        "step_s": 1.0,
    }
    path = tmp_path / "s.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({**base, "world_size": n, "micro_batch": 64 // n, "global_batch": 64, "images_per_s": x})
            for n, x in ((1, 100.0), (4, 320.0))
        )
        + "\n"
    )
    analyze([path], tmp_path / "a")
    rows = list(csv.DictReader(open(tmp_path / "a" / "scaling.csv")))
    # T_1 = 0.64 s, T_4 = 0.2 s -> 0.64 / (4 x 0.2) = 0.8
    assert float(rows[1]["efficiency"]) == pytest.approx(0.8)


def test_sweep_submits_one_job_per_node_count(tmp_path):
    env = dict(os.environ, SBATCH="echo", GALCF_SCALING_OUT=str(tmp_path / "res.jsonl"))
    done = subprocess.run(
        [
            "bash",
            "jobs/scaling_sweep.sh",
            "--account=abc",
            "configs/smoke.yaml",
            "1 2 4",
            "strong",
            "deepspeed",
            "torch",
            "--",
            "--set",
            "train.global_batch=64",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    for n, line in zip((1, 2, 4), lines):
        assert line.split() == [
            "--account=abc",
            "--dependency=singleton",
            f"--nodes={n}",
            "--job-name=galcf-scaling-strong-deepspeed-torch",
            "jobs/scaling.sbatch",
            "configs/smoke.yaml",
            "--mode",
            "strong",
            "--engine",
            "deepspeed",
            "--loader",
            "torch",
            "--out",
            str(tmp_path / "res.jsonl"),
            "--set",
            "train.global_batch=64",
        ]
    bad = subprocess.run(
        ["bash", "jobs/scaling_sweep.sh", "configs/smoke.yaml", "1 two"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "'two' is not a positive integer" in bad.stderr


def test_ring_calibration_recovers_bandwidth_and_latency():
    from galcf_hpc.scaling.harness import fit_ring

    points = [(s, P.ring_allreduce_time(s, 2, 2e9, 4e-5)) for s in (4, 65536, 1 << 20, 8 << 20)]
    bandwidth, latency = fit_ring(points, 2)
    assert bandwidth == pytest.approx(2e9, rel=1e-3) and latency == pytest.approx(4e-5, rel=1e-3)
    assert fit_ring(points, 1) == (None, None)
