"""``galcf-hpc scaling run|analyze|project``: argument parsing and printing; the work is in
harness.py, analyze.py and projection.py."""

from ..config import ENGINES, LOADERS
from . import projection as P


def cmd_run(args):
    from ..config import load_config
    from .harness import run_scaling

    cfg = load_config(args.config, args.set or [])
    record = run_scaling(
        cfg,
        mode=args.mode,
        engine=args.engine,
        loader=args.loader,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        out=args.out,
        config_path=args.config,
    )
    if record is not None:
        print(
            f"scaling {record['mode']} {record['engine']}/{record['loader']}: {record['world_size']} rank(s) on "
            f"{record['nodes']} node(s): {record['images_per_s']:.1f} images/s (median of {record['repeats']}; "
            f"{record['images_per_s_min']:.1f}-{record['images_per_s_max']:.1f}), data share "
            f"{record['data_share']:.1%}; appended to {args.out}"
        )


def cmd_analyze(args):
    from .analyze import analyze

    written = analyze(args.results, args.out)
    print("written: " + ", ".join(str(p) for p in written))


def cmd_project(args):
    machine = P.Machine(
        nvlink_bandwidth=args.nvlink_gbps * 1e9,
        ib_bandwidth=args.ib_gbps * 1e9,
        ib_latency=args.ib_latency_us * 1e-6,
        nvlink_latency=args.nvlink_latency_us * 1e-6,
        gpus_per_node=args.gpus_per_node,
        overlap=args.overlap,
    )
    written, base = P.project_command(
        results=args.from_results,
        config=args.config,
        step_time=args.step_time,
        data_time=args.data_time,
        micro=args.micro_batch,
        global_batch=args.global_batch,
        nodes=args.nodes,
        machine=machine,
        out=args.out,
        mode_filter=args.mode,
        engine=args.engine,
        loader=args.loader,
        sets=args.set or [],
    )
    print(
        f"projection from {base['source']}: compute {base['compute_s'] * 1e3:.2f} ms/step at micro-batch "
        f"{base['micro_batch']}, {base['parameters']} parameters"
    )
    print("written: " + ", ".join(str(p) for p in written))


def add_scaling_parser(sub):
    """Register ``scaling`` and its sub-commands on the top-level sub-parser set."""
    scaling = sub.add_parser(
        "scaling",
        help="scaling studies: time runs, tables/plots, JURECA-DC projection",
        description="Scaling studies: time training steps on N ranks, analyse the results into tables and plots, "
        "and project step times to JURECA-DC nodes.",
    )
    ssub = scaling.add_subparsers(dest="scaling_cmd", required=True)

    sp = ssub.add_parser(
        "run",
        help="time training steps on every rank (start with srun/torchrun/mpiexec)",
        description="Time training steps on every rank a launcher started (srun, torchrun or mpiexec): data wait, "
        "compute, communication and memory; rank 0 appends one JSON line to --out.",
    )
    sp.add_argument("--config", required=True, help="YAML run configuration")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    sp.add_argument(
        "--mode",
        choices=("weak", "strong"),
        default="weak",
        help="weak: fixed micro-batch per GPU; strong: fixed train.global_batch",
    )
    sp.add_argument("--engine", choices=ENGINES, default="ddp", help="training engine (default: ddp)")
    sp.add_argument("--loader", choices=LOADERS, default="synthetic", help="loader back-end (default: synthetic)")
    sp.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    sp.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    sp.add_argument("--repeats", type=int, default=3, help="timed blocks of --steps steps (default: 3)")
    sp.add_argument("--out", default="runs/scaling/results.jsonl", help="JSON-lines file rank 0 appends to")
    sp.set_defaults(func=cmd_run)

    sp = ssub.add_parser(
        "analyze",
        help="results.jsonl -> scaling.md, scaling.csv, PNG plots",
        description="Analyse the JSON lines of `scaling run` into a Markdown table, a CSV and plots of images/s, "
        "efficiency and data share per (mode, engine, loader).",
    )
    sp.add_argument("results", nargs="+", help="JSON-lines files written by `scaling run`")
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(func=cmd_analyze)

    sp = ssub.add_parser(
        "project",
        help="step-time model: weak/strong scaling on 1..64 JURECA-DC nodes",
        description="Project weak and strong scaling to JURECA-DC nodes with a step-time model "
        "(compute + data + the all-reduce not hidden by the backward pass).",
    )
    sp.add_argument(
        "--from",
        dest="from_results",
        help="results.jsonl: base step from its smallest run (and a measured check of the 2-rank run if present)",
    )
    sp.add_argument("--config", help="YAML config: parameter count of its model (with --step-time)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of --config")
    sp.add_argument("--step-time", type=float, help="ASSUMED single-GPU compute time per step, seconds")
    sp.add_argument("--data-time", type=float, default=0.0, help="exposed data time per step, seconds")
    sp.add_argument("--micro-batch", type=int, help="micro-batch of --step-time (default: config's)")
    sp.add_argument(
        "--global-batch", type=int, help="strong scaling: fixed global batch (default: micro x 4 x largest node count)"
    )
    sp.add_argument("--mode", choices=("weak", "strong"), help="with --from: only records of this mode")
    sp.add_argument("--engine", help="with --from: only records of this engine")
    sp.add_argument("--loader", help="with --from: only records of this loader")
    sp.add_argument("--nodes", type=int, nargs="+", default=list(P.DEFAULT_NODES), help="node counts to project")
    sp.add_argument("--gpus-per-node", type=int, default=P.JURECA_DC.gpus_per_node, help="GPUs (ranks) per node")
    sp.add_argument(
        "--nvlink-gbps",
        type=float,
        default=P.JURECA_DC.nvlink_bandwidth / 1e9,
        help="intra-node all-reduce bus bandwidth, GB/s",
    )
    sp.add_argument(
        "--nvlink-latency-us",
        type=float,
        default=P.JURECA_DC.nvlink_latency * 1e6,
        help="intra-node all-reduce latency per hop, microseconds (assumed)",
    )
    sp.add_argument(
        "--ib-gbps",
        type=float,
        default=P.JURECA_DC.ib_bandwidth / 1e9,
        help="inter-node bandwidth per node, GB/s (HDR 200 Gb/s = 25 GB/s)",
    )
    sp.add_argument(
        "--ib-latency-us",
        type=float,
        default=P.JURECA_DC.ib_latency * 1e6,
        help="inter-node latency per hop, microseconds (assumed)",
    )
    sp.add_argument(
        "--overlap",
        type=float,
        default=P.JURECA_DC.overlap,
        help="fraction of the backward pass that can hide the all-reduce (0..1)",
    )
    sp.add_argument("--out", required=True, help="output directory")
    sp.set_defaults(func=cmd_project)
    return scaling
