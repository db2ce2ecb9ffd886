"""A step-time model of data-parallel training on N JURECA-DC nodes x 4 GPUs.

    T(N) = T_compute + T_data_exposed + T_comm_exposed

- ``T_compute``: forward + backward + optimiser of one micro-batch on one GPU, taken from a
  measured run (``--from results.jsonl``) or given as an assumption (``--step-time``);
  linear in the micro-batch (strong scaling), which ignores that small micro-batches use a
  GPU less well: strong-scaling projections are optimistic at high GPU counts.
- ``T_data_exposed``: the measured time blocked waiting for data (0 by default when the
  step time is assumed); per GPU it is unchanged by weak scaling, linear in the micro-batch
  for strong scaling (every node reads from its own CPUs and the parallel file system).
- ``T_comm_exposed``: the part of the gradient all-reduce that the backward pass does not
  hide: ``max(0, T_allreduce - overlap x backward_fraction x T_compute)``; DDP starts the
  all-reduce of a gradient bucket as soon as it is ready, ``overlap`` says how much of the
  backward pass is usable for that (default 0.5), ``backward_fraction`` the backward share
  of the compute (2/3: backward costs about twice the forward).
- ring all-reduce of ``S`` bytes over ``p`` GPUs: ``2 (p-1)/p S / B + 2 (p-1) alpha``. Within
  one node the ring runs over NVLink (``B`` = ``nvlink_bandwidth``), across nodes it is
  limited by each node's single HDR InfiniBand link, which the traffic of all four GPUs of
  the node shares: ``B`` = the per-node IB bandwidth, ``alpha`` = the IB latency. ``S`` =
  trainable parameters x 4 bytes (fp32 gradients; bf16 autocast keeps fp32 parameters).

Constants (``JURECA_DC``), sources:
- 4 A100 40 GB per node, HDR InfiniBand 200 Gb/s per node: /work/shared/FACTS.md
  ("JURECA-DC ... 4x NVIDIA A100 40 GB ... HDR InfiniBand"), JSC's JURECA-DC system page.
- 200 Gb/s = 25 GB/s per node and direction; latency 5 us per hop: HDR link latency is
  ~1 us, NCCL's per-step software latency several us; 5 us is an assumed round value.
- NVLink 3 all-reduce bus bandwidth 200 GB/s: A100 has 600 GB/s total NVLink bandwidth;
  NCCL's all_reduce_perf reaches ~200-230 GB/s "busbw" on 4-GPU A100 nodes; assumed, not
  measured here. Intra-node latency 2 us: assumed.
Every constant is a command-line option of ``galcf-hpc scaling project``.
"""

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, DataError, UsageError

DEFAULT_NODES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Machine:
    gpus_per_node: int = 4
    nvlink_bandwidth: float = 200e9  # B/s, intra-node all-reduce bus bandwidth (assumed, A100 NVLink 3)
    nvlink_latency: float = 2e-6  # s per ring hop inside a node (assumed)
    ib_bandwidth: float = 25e9  # B/s per node: HDR InfiniBand 200 Gb/s (FACTS.md)
    ib_latency: float = 5e-6  # s per ring hop between nodes (assumed)
    overlap: float = 0.5  # fraction of the backward pass usable to hide the all-reduce
    backward_fraction: float = 2 / 3  # backward share of the compute time

    def __post_init__(self):
        if not 0 <= self.overlap <= 1 or not 0 <= self.backward_fraction <= 1:
            raise ConfigError(f"overlap {self.overlap} and backward_fraction {self.backward_fraction} must be in 0..1")
        if min(self.nvlink_bandwidth, self.ib_bandwidth) <= 0 or self.gpus_per_node < 1:
            raise ConfigError("bandwidths and GPUs per node must be positive")


JURECA_DC = Machine()


def ring_allreduce_time(nbytes, p, bandwidth, latency):
    """Ring all-reduce of ``nbytes`` over ``p`` ranks: 2(p-1)/p S/B + 2(p-1) alpha; 0 for p = 1."""
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if p == 1:
        return 0.0
    return 2 * (p - 1) / p * nbytes / bandwidth + 2 * (p - 1) * latency


def allreduce_time(nbytes, gpus, machine=JURECA_DC):
    """Gradient all-reduce over ``gpus`` GPUs packed ``gpus_per_node`` to a node."""
    if gpus <= machine.gpus_per_node:
        return ring_allreduce_time(nbytes, gpus, machine.nvlink_bandwidth, machine.nvlink_latency)
    return ring_allreduce_time(nbytes, gpus, machine.ib_bandwidth, machine.ib_latency)


def exposed_comm(t_allreduce, t_compute, overlap, backward_fraction=2 / 3):
    """The all-reduce time the backward pass does not hide."""
    return max(0.0, t_allreduce - overlap * backward_fraction * t_compute)


def step_time(t_compute, t_data, t_allreduce, machine=JURECA_DC):
    return t_compute + t_data + exposed_comm(t_allreduce, t_compute, machine.overlap, machine.backward_fraction)


def _row(mode, gpus, micro, global_batch, t_compute, t_data, grad_bytes, machine):
    t_ar = allreduce_time(grad_bytes, gpus, machine)
    t_exp = exposed_comm(t_ar, t_compute, machine.overlap, machine.backward_fraction)
    t = t_compute + t_data + t_exp
    return {
        "mode": mode,
        "nodes": max(1, math.ceil(gpus / machine.gpus_per_node)),
        "gpus": gpus,
        "micro_batch": micro,
        "global_batch": global_batch,
        "compute_s": t_compute,
        "data_s": t_data,
        "allreduce_s": t_ar,
        "comm_exposed_s": t_exp,
        "step_s": t,
        "images_per_s": global_batch / t,
    }


def project(compute_s, micro, grad_bytes, nodes=DEFAULT_NODES, data_s=0.0, global_batch=None, machine=JURECA_DC):
    """Weak and strong rows for 1 GPU and every node count. Weak: ``micro`` per GPU.
    Strong: ``global_batch`` fixed (default 8 x the GPUs of the largest node count), split
    evenly; node counts whose GPUs do not divide it are left out. Efficiency: weak
    X_N / (N X_1), strong T_1 / (N T_N), T = time per global batch."""
    if compute_s <= 0 or micro < 1 or grad_bytes <= 0:
        raise ConfigError(
            f"need a positive step time, micro-batch and gradient size (got {compute_s}, {micro}, {grad_bytes})"
        )
    counts = [1] + [n * machine.gpus_per_node for n in sorted(set(nodes)) if n >= 1]
    rows = []
    base = None
    for gpus in counts:
        r = _row("weak", gpus, micro, micro * gpus, compute_s, data_s, grad_bytes, machine)
        base = base or r
        r["efficiency"] = r["images_per_s"] / (gpus * base["images_per_s"])
        rows.append(r)
    G = global_batch or 8 * counts[-1]
    base = None
    for gpus in counts:
        if G % gpus:
            continue
        m = G // gpus
        r = _row("strong", gpus, m, G, compute_s * m / micro, data_s * m / micro, grad_bytes, machine)
        if base is None:
            base = (
                r
                if gpus == 1
                else _row("strong", 1, G, G, compute_s * G / micro, data_s * G / micro, grad_bytes, machine)
            )
        r["efficiency"] = base["step_s"] / (gpus * r["step_s"])
        rows.append(r)
    return rows


def validate_two_rank(one, two, overlap=0.0, backward_fraction=2 / 3):
    """Predict the 2-rank run from the measured 1-rank step and the all-reduce bandwidth and
    latency the harness measured on the same machine; compare with the measured 2-rank run.
    ``one``, ``two``: records of ``scaling run`` (same mode, engine, loader, micro-batch).
    Weak scaling only (the 2-rank step has the 1-rank micro-batch)."""
    if one["world_size"] != 1 or two["world_size"] != 2:
        raise DataError(
            f"validation needs a 1-rank and a 2-rank record, got {one['world_size']} and {two['world_size']}"
        )
    if one["micro_batch"] != two["micro_batch"]:
        raise DataError("validation needs the same micro-batch in both runs (weak scaling)")
    bw, lat = two.get("comm_bandwidth_Bps"), two.get("comm_latency_s")
    if not bw or lat is None:
        raise DataError("the 2-rank record has no measured all-reduce bandwidth/latency (comm_bandwidth_Bps)")
    t_ar = ring_allreduce_time(two["grad_bytes"], 2, bw, lat)
    t1 = one["step_s"]
    t2_pred = t1 + exposed_comm(t_ar, one["compute_s"], overlap, backward_fraction)
    x1 = one["global_batch"] / t1
    x2_pred = two["global_batch"] / t2_pred
    x2 = two["images_per_s"]
    eff_meas = x2 / (2 * one["images_per_s"])
    eff_pred = x2_pred / (2 * x1)
    out = {
        "grad_bytes": two["grad_bytes"],
        "bandwidth_Bps": bw,
        "latency_s": lat,
        "overlap": overlap,
        "allreduce_pred_s": t_ar,
        "allreduce_measured_s": two.get("allreduce_grad_s"),
        "step1_s": t1,
        "step2_pred_s": t2_pred,
        "step2_measured_s": two["step_s"],
        "images_per_s_1": one["images_per_s"],
        "images_per_s_2_pred": x2_pred,
        "images_per_s_2_measured": x2,
        "efficiency_pred": eff_pred,
        "efficiency_measured": eff_meas,
        "rel_error_images_per_s": (x2_pred - x2) / x2,
        "rel_error_efficiency": (eff_pred - eff_meas) / eff_meas,
        # what the model leaves out: measured exposed communication (DDP step - no_sync step)
        # and the slowdown of the compute itself when two ranks share the machine
        "comm_exposed_pred_s": t2_pred - t1,
        "comm_exposed_measured_s": two.get("comm_exposed_s"),
        "compute_nosync_2_s": two.get("compute_nosync_s"),
        "compute_slowdown": (two["compute_nosync_s"] / one["compute_s"] if two.get("compute_nosync_s") else None),
    }
    if two.get("compute_nosync_s"):  # the same model on the compute the 2 ranks really had
        t2_alt = (
            two["compute_nosync_s"]
            + one["data_s"]
            + exposed_comm(t_ar, two["compute_nosync_s"], overlap, backward_fraction)
        )
        out["images_per_s_2_pred_nosync"] = two["global_batch"] / t2_alt
        out["rel_error_images_per_s_nosync"] = (two["global_batch"] / t2_alt - x2) / x2
    return out


def _matching(records, mode=None, engine=None, loader=None):
    return [
        r
        for r in records
        if (mode is None or r["mode"] == mode)
        and (engine is None or r["engine"] == engine)
        and (loader is None or r["loader"] == loader)
    ]


def _base_from_results(records):
    smallest = min(r["world_size"] for r in records)
    pick = [r for r in records if r["world_size"] == smallest]
    r = pick[-1]
    return {
        "source": f"measured {r['world_size']}-rank run ({r['mode']}, {r['engine']}/{r['loader']}, "
        f"{', '.join(r['devices'])})",
        "compute_s": r["compute_s"] if r["world_size"] == 1 else min(x["compute_s"] for x in pick),
        "data_s": r["data_s"],
        "micro_batch": r["micro_batch"],
        "parameters": r["parameters"],
        "grad_bytes": r["grad_bytes"],
        "assumed": False,
    }


def _base_from_config(config, sets, step_time, data_time, micro):
    from ..config import load_config
    from ..model.galcf import GalaxyCF

    if step_time is None:
        raise UsageError("--config needs --step-time (the assumed single-GPU compute time per step, seconds)")
    cfg = load_config(config, sets)
    model = GalaxyCF.from_config(cfg)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "source": f"ASSUMED step time {step_time * 1e3:.1f} ms/step (not measured) for the model of {config} "
        f"({cfg.data.image_size} px)",
        "compute_s": step_time,
        "data_s": data_time,
        "micro_batch": micro or cfg.train.batch_size,
        "parameters": params,
        "grad_bytes": 4 * params,
        "assumed": True,
    }


def project_command(
    results=None,
    config=None,
    step_time=None,
    data_time=0.0,
    micro=None,
    global_batch=None,
    nodes=DEFAULT_NODES,
    machine=JURECA_DC,
    out="runs/scaling/projection",
    mode_filter=None,
    engine=None,
    loader=None,
    sets=(),
):
    """Write DIR/projection.md, .csv, .json and .png; returns (paths, base)."""
    from .analyze import load_results

    if bool(results) == bool(config):
        raise ConfigError("give either --from RESULTS.jsonl (measured base step) or --config C --step-time S")
    validation = []
    if results:
        records = _matching(load_results([results]), mode_filter, engine, loader)
        if not records:
            raise DataError(f"{results}: no records match mode={mode_filter} engine={engine} loader={loader}")
        if step_time is not None:
            raise UsageError("--step-time goes with --config, not --from")
        base = _base_from_results(records)
        if micro:
            raise UsageError("--micro-batch goes with --config; with --from it is the measured run's")
        groups = {}
        for r in records:
            groups.setdefault((r["mode"], r["engine"], r["loader"], r["micro_batch"]), {})[r["world_size"]] = r
        for key, by_world in sorted(groups.items()):
            if key[0] == "weak" and 1 in by_world and 2 in by_world and by_world[2].get("comm_bandwidth_Bps"):
                for ov in (0.0, machine.overlap):
                    validation.append(
                        {
                            "group": "/".join(map(str, key[:3])),
                            **validate_two_rank(
                                by_world[1], by_world[2], overlap=ov, backward_fraction=machine.backward_fraction
                            ),
                        }
                    )
    else:
        base = _base_from_config(config, sets, step_time, data_time, micro)
    rows = project(
        base["compute_s"], base["micro_batch"], base["grad_bytes"], nodes, base["data_s"], global_batch, machine
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "projection.md", out / "projection.csv", out / "projection.json", out / "projection.png"]
    with open(paths[1], "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths[2].write_text(
        json.dumps({"base": base, "machine": asdict(machine), "rows": rows, "validation": validation}, indent=2) + "\n"
    )
    paths[0].write_text(_markdown(base, machine, rows, validation))
    _plot(rows, base, paths[3])
    return paths, base


def _markdown(base, machine, rows, validation):
    m = machine
    lines = [
        f"# Scaling projection ({'ASSUMED step time' if base['assumed'] else 'measured base step'})",
        "",
        f"Base: {base['source']}; compute {base['compute_s'] * 1e3:.2f} ms, exposed data "
        f"{base['data_s'] * 1e3:.2f} ms per step at micro-batch {base['micro_batch']}; "
        f"{base['parameters']:,} trainable parameters = {base['grad_bytes'] / 1e6:.1f} MB of fp32 gradients.",
        "",
        f"Machine: {m.gpus_per_node} GPUs/node; intra-node {m.nvlink_bandwidth / 1e9:.0f} GB/s, "
        f"{m.nvlink_latency * 1e6:.1f} us; inter-node {m.ib_bandwidth / 1e9:.1f} GB/s per node, "
        f"{m.ib_latency * 1e6:.1f} us; overlap {m.overlap:.2f} of the backward pass "
        f"({m.backward_fraction:.2f} of the compute).",
        "",
        "| mode | nodes | GPUs | micro-batch | global batch | step (ms) | all-reduce (ms) | exposed comm (ms) "
        "| images/s | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['nodes']} | {r['gpus']} | {r['micro_batch']} | {r['global_batch']} | "
            f"{r['step_s'] * 1e3:.2f} | {r['allreduce_s'] * 1e3:.2f} | {r['comm_exposed_s'] * 1e3:.2f} | "
            f"{r['images_per_s']:.1f} | {r['efficiency']:.3f} |"
        )
    if validation:
        lines += [
            "",
            "## Check against the measured 2-rank run",
            "",
            "Prediction = measured 1-rank step + exposed ring all-reduce with the bandwidth and latency measured "
            "by the harness's all-reduce microbenchmark on the same machine (4-byte and gradient-size messages). "
            "Last column: the same model with the compute the two ranks really had (DDP no-sync step), i.e. "
            "the communication model alone; the difference between the two is the slowdown of the compute "
            "when the ranks share the machine, which the model does not include.",
            "",
            "| group | overlap | bandwidth (GB/s) | latency (us) | all-reduce pred/meas (ms) | 2-rank images/s "
            "pred | measured | efficiency pred | measured | error (images/s) | exposed comm pred/meas (ms) "
            "| 2-rank no-sync compute / 1-rank compute | images/s pred from 2-rank no-sync compute (error) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v in validation:
            lines.append(
                f"| {v['group']} | {v['overlap']:.2f} | {v['bandwidth_Bps'] / 1e9:.2f} | "
                f"{v['latency_s'] * 1e6:.1f} | {v['allreduce_pred_s'] * 1e3:.2f} / "
                f"{_ms(v['allreduce_measured_s'])} | "
                f"{v['images_per_s_2_pred']:.1f} | {v['images_per_s_2_measured']:.1f} | "
                f"{v['efficiency_pred']:.3f} | {v['efficiency_measured']:.3f} | "
                f"{v['rel_error_images_per_s']:+.1%} | {v['comm_exposed_pred_s'] * 1e3:.2f} / "
                f"{_ms(v['comm_exposed_measured_s'])} | "
                + (
                    f"{v['compute_slowdown']:.2f} | {v['images_per_s_2_pred_nosync']:.1f} "
                    f"({v['rel_error_images_per_s_nosync']:+.1%}) |"
                    if v["compute_slowdown"]
                    else "- | - |"
                )
            )
    return "\n".join(lines) + "\n"


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _plot(rows, base, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in (("weak", "o"), ("strong", "s")):
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        gpus = [r["gpus"] for r in rs]
        axes[0].plot(gpus, [r["images_per_s"] for r in rs], marker=marker, label=mode)
        axes[1].plot(gpus, [r["efficiency"] for r in rs], marker=marker, label=mode)
    axes[0].set(xscale="log", yscale="log", xlabel="GPUs", ylabel="images/s (projected)")
    axes[1].set(xscale="log", xlabel="GPUs", ylabel="efficiency (projected)", ylim=(0, 1.05))
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        ("ASSUMED " if base["assumed"] else "") + f"step {base['compute_s'] * 1e3:.1f} ms, "
        f"{base['grad_bytes'] / 1e6:.1f} MB gradients",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
