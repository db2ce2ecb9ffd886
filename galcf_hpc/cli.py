"""``galcf-hpc``: the command line. Subcommands call into the package modules; this is the
only place (with config.py) that parses arguments."""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import GalcfError

log = logging.getLogger("galcf_hpc")

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _load(args):
    from .config import load_config

    return load_config(args.config, args.set or [])


def cmd_synth(args):
    from .data.classes import NUM_CLASSES
    from .data.galaxy10 import write_catalog
    from .data.synth import generate
    from .progress import Progress

    fractions = [1.0 / NUM_CLASSES] * NUM_CLASSES if args.balanced else None
    cat = generate(args.n, args.size, args.seed, workers=args.workers, class_fractions=fractions,
                   progress=Progress(args.n, "synth"))
    write_catalog(args.out, **cat, attrs={"generator": f"galcf-hpc {__version__} GalSim synthetic",
                                           "seed": args.seed})
    print(f"wrote {args.n} synthetic galaxies ({args.size} px) to {args.out}")


def cmd_shard(args):
    from .data.shards import write_shards
    from .progress import Progress

    summary = write_shards(args.input, args.out, shard_size=args.shard_size, seed=args.seed,
                           image_format=args.format, progress=Progress(1, "shard"))
    for split, info in summary["splits"].items():
        print(f"{split:5s}: {info['num_samples']} galaxies in {info['num_shards']} shards")
    conflicts = summary["conflicting_groups"]
    if conflicts:
        print(f"{len(conflicts)} groups of repeated cutouts carry conflicting labels (kept in one split each; "
              f"listed in {Path(args.out) / 'splits.json'})")
    print(f"wrote {args.out}; check it with `galcf-hpc data verify {args.out}`")


def cmd_verify(args):
    from .data.shards import verify_shards

    counts = verify_shards(args.dir)
    print(f"OK: {args.dir} verified ({', '.join(f'{k} {v}' for k, v in counts.items())})")


def cmd_train(args):
    from .train.loop import train

    cfg = _load(args)
    result = train(cfg, resume=args.resume)
    if result is not None:  # rank 0 of a finished run; other ranks and stopped runs print nothing more
        _print_eval(result)


def cmd_explain(args):
    from .data.classes import class_index
    from .explain.run import explain

    targets = None
    if args.targets:
        try:
            targets = [class_index(t) for t in args.targets]
        except ValueError as exc:
            raise GalcfError(f"--targets: {exc}") from None
    summary = explain(args.run, split=args.split, targets=targets, max_galaxies=args.max_galaxies,
                      device=args.device, checkpoint=args.checkpoint)
    _print_explain(summary)


def cmd_weights_fetch(args):
    from .model.vgg import fetch_vgg16

    path = fetch_vgg16(args.out)
    print(f"VGG16 ImageNet weights saved to {path}; set model.vgg_weights: {path}")


def cmd_config(args):
    from .config import dump_config

    print(dump_config(_load(args)), end="")


def _config_argv(config, sets):
    return ["--config", str(config)] + [x for s in sets for x in ("--set", s)]


def _train_ranks(config, sets, ranks, cfg):
    """Train with ``ranks`` local processes (torchrun-style environment, 1 torch thread each,
    the same global batch as one process); False when the launch failed."""
    import subprocess

    from .train.distributed import free_port

    port = free_port()
    extra = ["train.threads=1", f"train.global_batch={cfg.train.global_batch or cfg.train.batch_size}"]
    argv = [sys.executable, "-m", "galcf_hpc.cli", "train"] + _config_argv(config, list(sets) + extra) + ["--resume"]
    procs = []
    for r in range(ranks):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(argv, env=env))
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.kill()
        raise
    if any(codes):
        log.warning("training with %d local ranks failed (exit codes %s)", ranks, codes)
        return False
    return True


def _run_catalog(run_dir, split_dir, out_dir, ranks):
    """The catalog job on one split: ``mpiexec -n ranks`` when mpiexec is on PATH, else in process."""
    import shutil
    import subprocess

    if (out_dir / "catalog.h5").exists():
        log.info("catalog %s exists: reused", out_dir / "catalog.h5")
        return
    mpiexec = shutil.which("mpiexec")
    args = ["catalog", "run", "--checkpoint", str(run_dir), "--input", str(split_dir), "--out", str(out_dir),
            "--unit-size", "64", "--device", "cpu"]
    if mpiexec and ranks > 1:
        rc = subprocess.call([mpiexec, "-n", str(ranks), sys.executable, "-m", "galcf_hpc.cli"] + args)
        if rc == 0:
            return
        log.warning("mpiexec -n %d catalog run failed (exit code %d); running it in this process", ranks, rc)
    elif not mpiexec:
        log.warning("mpiexec not on PATH: catalog job in a single process")
    cmd_catalog_run(build_parser().parse_args(args))


def cmd_demo(args):
    import json
    import os

    from .baseline import train_baseline
    from .config import load_config
    from .data.classes import NUM_CLASSES
    from .data.galaxy10 import write_catalog
    from .data.shards import write_shards
    from .data.synth import generate
    from .explain.run import explain
    from .progress import Progress
    from .report import build_report
    from .train.loop import train

    config = Path(args.config) if args.config else REPO_CONFIGS / "smoke.yaml"
    sets = args.set or []
    cfg = load_config(config, sets)
    t0 = time.monotonic()
    times = {}
    source, shards = Path(cfg.data.source), Path(cfg.data.shards)
    run_dir = Path(cfg.run.out_dir)
    s = cfg.data.synth
    if not source.exists():
        fractions = [1.0 / NUM_CLASSES] * NUM_CLASSES if s.balanced else None
        cat = generate(s.n, s.size, s.seed, workers=s.workers, class_fractions=fractions,
                       progress=Progress(s.n, "synth"))
        write_catalog(source, **cat, attrs={"generator": f"galcf-hpc {__version__} GalSim synthetic",
                                             "seed": s.seed})
        log.info("synthesised %d galaxies into %s (%.0f s)", s.n, source, time.monotonic() - t0)
    if not (shards / "train" / "manifest.json").exists():
        write_shards(source, shards, shard_size=cfg.data.shard_size, fractions=tuple(cfg.data.split_fractions),
                     seed=cfg.data.split_seed)
        log.info("sharded into %s (%.0f s)", shards, time.monotonic() - t0)
    times["data"] = time.monotonic() - t0

    t = time.monotonic()
    ranks = args.ranks if args.ranks else (2 if (os.cpu_count() or 1) >= 2 else 1)
    trained = False
    if ranks > 1:
        log.info("training with %d local ranks (torchrun-style environment, 1 thread each)", ranks)
        trained = _train_ranks(config, sets, ranks, cfg)
        if not trained:
            log.warning("falling back to training in this process")
    if not trained:
        train(cfg, resume=True)
    result = json.loads((run_dir / "eval.json").read_text())
    times["train"] = time.monotonic() - t

    t = time.monotonic()
    base_eval = run_dir / "baseline" / "eval.json"
    if base_eval.exists():
        log.info("baseline classifier %s exists: reused", base_eval.parent)
    else:
        train_baseline(cfg, **({"epochs": args.baseline_epochs} if args.baseline_epochs else {}))
    times["baseline"] = time.monotonic() - t

    t = time.monotonic()
    summary = explain(run_dir, split=cfg.explain.split)
    times["explain"] = time.monotonic() - t
    t = time.monotonic()
    catalog_dir = run_dir / "catalog"
    _run_catalog(run_dir, shards / cfg.explain.split, catalog_dir, ranks)
    times["catalog"] = time.monotonic() - t
    t = time.monotonic()
    report = build_report(run_dir, catalog=catalog_dir)
    times["report"] = time.monotonic() - t

    print(f"\n== galcf-hpc demo ({config.name}) finished in {time.monotonic() - t0:.0f} s ==")
    print("  " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"validation accuracy {result['accuracy']:.3f} (eval.json)")
    _print_explain(summary)
    _print_report(report)


def _print_report(rep):
    m, b = rep["classification"]["model"], rep["classification"]["baseline"]
    o = rep["counterfactuals"]["overall"]
    line = f"{rep['split']}: model accuracy {m['accuracy']:.3f}"
    if b:
        line += f", independent baseline CNN accuracy {b['accuracy']:.3f}"
    print(line)
    vi = o["validity_independent"]
    print(f"counterfactual validity: by the model {o['validity_model']:.3f}, by the independent classifier "
          + (f"{vi:.3f}" if vi is not None else "n/a (no baseline)"))
    sil = rep["silhouette"]
    print("silhouette by class (original space / t-SNE): " + ", ".join(
        f"{k} {_num(v['original'])}/{_num(v['tsne'])}" for k, v in sil.items()))
    if rep["baseline"]["note"]:
        print(f"note: {rep['baseline']['note']}")
    print(f"report: {Path(rep['html']).resolve()}  (numbers: {Path(rep['run']) / 'report' / 'report.json'})")


def _num(x):
    return "n/a" if x is None else f"{x:.3f}"


def cmd_baseline_train(args):
    from .baseline import train_baseline

    cfg = _load(args)
    r = train_baseline(cfg, epochs=args.epochs, lr=args.lr, device=args.device)
    print(f"baseline CNN ({r['settings']['epochs']} epochs, lr {r['settings']['lr']}, {r['train_seconds']:.0f} s)")
    for split, e in r["splits"].items():
        print(f"{split} accuracy {e['accuracy']:.3f}  macro-F1 {e['macro_f1']:.3f}  ({e['num_galaxies']} galaxies)")
    print(f"wrote {Path(cfg.run.out_dir) / 'baseline'}/model.pt and eval.json")


def cmd_report(args):
    from .report import build_report

    rep = build_report(args.run, catalog=args.catalog, out=args.out, max_galaxies=args.max_galaxies,
                       device=args.device, tsne=not args.no_tsne)
    _print_report(rep)


def _mpi_world():
    """COMM_WORLD when started by an MPI launcher with more than one rank, else None."""
    launched = max(int(os.environ.get(k, "1") or 1) for k in ("SLURM_STEP_NUM_TASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    try:
        from mpi4py import MPI
    except ImportError:
        MPI = None
    size = MPI.COMM_WORLD.Get_size() if MPI else 1
    if launched > 1 and size == 1:
        # every task would explain the whole catalog on its own
        raise GalcfError(f"the launcher started {launched} tasks but each sees an MPI world of size 1"
                         f"{'' if MPI else ' (mpi4py is not installed)'}: srun's MPI plug-in does not match the MPI "
                         "of mpi4py. With the pip mpich wheel use `srun --mpi=pmi2` (or MpiDefault=pmi2); on JSC "
                         "systems load the MPI module mpi4py was built against")
    return MPI.COMM_WORLD if size > 1 else None


def cmd_catalog_run(args):
    from .catalog.job import RankStopped, run_catalog

    comm = _mpi_world()
    try:
        s = run_catalog(args.checkpoint, args.input, args.out, targets=args.targets, unit_size=args.unit_size,
                        device=args.device, image_dtype=args.image_dtype, comm=comm,
                        kill_at_unit=args.fault_kill_at_unit)
    except RankStopped:
        sys.exit(2)  # rank 0 reports the reason once
    if comm and comm.Get_rank():
        return
    print(f"catalog: {s['num_galaxies']} galaxies in {s['num_units']} units: {s['skipped_units']} finished "
          f"before (skipped), {s['computed_units']} computed on {s['ranks']} rank(s), {s['device']}")
    for r in s["per_rank"]:
        print(f"  rank {r['rank']}: {r['units']} units, {r['galaxies']} galaxies, {r['seconds']:.1f} s, "
              f"{r['galaxies_per_s']:.2f} galaxies/s")
    print(f"wrote {s['catalog']}; check it with `galcf-hpc catalog verify {Path(s['catalog']).parent}`")


def cmd_catalog_pack(args):
    from .catalog.job import verify_catalog
    from .catalog.store import CATALOG, pack_catalog

    verify_catalog(args.dir)  # never pack a catalog with holes
    out = args.out or args.dir / "catalog_packed.h5"
    n = pack_catalog(args.dir / CATALOG, out)
    print(f"packed {n} galaxies into {out} (one file, no part files needed)")


def cmd_catalog_verify(args):
    from .catalog.job import verify_catalog

    s = verify_catalog(args.dir)
    for note in s["notes"]:
        print(f"note: {note}")
    print(f"OK: {args.dir}: {s['num_galaxies']} galaxies, {s['num_units']} parts, {len(s['targets'])} targets; "
          "every input key once, no fill values, provenance consistent")


def _print_eval(result):
    print(f"{result['split']} accuracy {result['accuracy']:.3f}  macro-F1 {result['macro_f1']:.3f}  "
          f"({result['num_galaxies']} galaxies)")
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:26s} {acc:.3f}")


def _print_explain(summary):
    o = summary["overall"]
    print(f"{summary['split']} accuracy {summary['accuracy']:.3f}  macro-F1 {summary['macro_f1']:.3f}  "
          f"({summary['num_galaxies']} galaxies)")
    for name, acc in summary["per_class_accuracy"].items():
        print(f"  {name:26s} {acc:.3f}")
    print(f"counterfactuals ({summary['split']}, {summary['num_galaxies']} galaxies, {o['n']} counterfactuals): "
          f"validity {o['validity']:.3f}  SSIM(x_cf, x~) {o['ssim_rec']:.3f}  MSD(x_cf, x~) {o['msd_rec']:.5f}  "
          f"SSIM(x_cf, x) {o['ssim_input']:.3f}  background/centre change {o['background_msd']:.2e}/"
          f"{o['center_msd']:.2e}")
    rec = summary["reconstruction"]
    print(f"reconstruction x~ vs input x: MSD {rec['msd']:.5f}  SSIM {rec['ssim']:.3f}")
    print(f"written: {Path(summary['run']) / 'counterfactuals.json'}, counterfactual_grid.png, saliency_grid.png")


def build_parser():
    p = argparse.ArgumentParser(prog="galcf-hpc", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"galcf-hpc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, required=True):
        sp.add_argument("--config", required=required, help="YAML run configuration")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")

    data = sub.add_parser("data", help="synthesise, shard and verify data").add_subparsers(dest="data_cmd", required=True)
    sp = data.add_parser("synth", help="render a Galaxy10-like catalog with GalSim (astroNN .h5 format)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--n", type=int, required=True)
    sp.add_argument("--size", type=int, default=64)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--workers", type=int, default=2)
    sp.add_argument("--balanced", action="store_true", help="equal class fractions instead of Galaxy10's")
    sp.set_defaults(func=cmd_synth)
    sp = data.add_parser("shard", help="split an astroNN .h5 into WebDataset shards + DALI index + manifests")
    sp.add_argument("--input", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--shard-size", type=int, default=1000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--format", choices=("png", "jpg"), default="png")
    sp.set_defaults(func=cmd_shard)
    sp = data.add_parser("verify", help="re-check shards, index files and manifests")
    sp.add_argument("dir")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("train", help="train the model (single process)")
    with_config(sp)
    sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of run.out_dir")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("explain", help="counterfactuals and their metrics for a split of a trained run")
    sp.add_argument("--run", required=True, help="run directory (with checkpoints/)")
    sp.add_argument("--split", default=None)
    sp.add_argument("--targets", nargs="+", help="target classes (names or numbers); default all")
    sp.add_argument("--max-galaxies", type=int, default=None)
    sp.add_argument("--device", default="auto")
    sp.add_argument("--checkpoint", default=None, help="a specific checkpoint file instead of the newest")
    sp.set_defaults(func=cmd_explain)

    catalog = sub.add_parser("catalog", help="counterfactuals for a whole catalog (MPI batch job) -> HDF5").add_subparsers(
        dest="catalog_cmd", required=True)
    sp = catalog.add_parser("run", help="run or resume the job (start with mpiexec -n N / srun; one rank per GPU)")
    sp.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory (newest checkpoint)")
    sp.add_argument("--input", required=True, help="shard split directory (e.g. shards/test) or astroNN .h5")
    sp.add_argument("--out", required=True, help="output directory (parts/, catalog.h5, run.json)")
    sp.add_argument("--targets", default="all", help="all, or class names/numbers separated by commas")
    sp.add_argument("--unit-size", type=int, default=256, help="galaxies per work unit (and part file)")
    sp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    sp.add_argument("--image-dtype", choices=("uint8", "float16"), default="uint8")
    sp.add_argument("--fault-kill-at-unit", type=int, default=None, help=argparse.SUPPRESS)  # restart tests
    sp.set_defaults(func=cmd_catalog_run)
    sp = catalog.add_parser("pack", help="verify, then copy catalog.h5 into one self-contained file (no parts)")
    sp.add_argument("dir", type=Path)
    sp.add_argument("--out", type=Path, help="default: DIR/catalog_packed.h5")
    sp.set_defaults(func=cmd_catalog_pack)
    sp = catalog.add_parser("verify", help="check a catalog directory: every key once, no holes, provenance")
    sp.add_argument("dir")
    sp.set_defaults(func=cmd_catalog_verify)

    weights = sub.add_parser("weights", help="VGG16 weights for the perceptual loss").add_subparsers(
        dest="weights_cmd", required=True)
    sp = weights.add_parser("fetch", help="download torchvision's VGG16 ImageNet weights (needs internet)")
    sp.add_argument("--out", default="weights/vgg16-397923af.pth")
    sp.set_defaults(func=cmd_weights_fetch)

    sp = sub.add_parser("config", help="print the resolved configuration (validates it)")
    with_config(sp)
    sp.set_defaults(func=cmd_config)

    sp = sub.add_parser("demo", help="synthesise -> shard -> train -> baseline -> explain -> catalog -> report "
                                      "on the smoke config")
    with_config(sp, required=False)
    sp.add_argument("--ranks", type=int, default=0, help="local training processes (default: 2 with >= 2 cores)")
    sp.add_argument("--baseline-epochs", type=int, default=None, help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_demo)

    baseline = sub.add_parser("baseline", help="independent plain CNN classifier (for independent validity)"
                              ).add_subparsers(dest="baseline_cmd", required=True)
    sp = baseline.add_parser("train", help="train it on the run's train split -> RUN/baseline/")
    with_config(sp)
    sp.add_argument("--epochs", type=int, default=25)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    sp.set_defaults(func=cmd_baseline_train)

    sp = sub.add_parser("report", help="HTML report of a trained run (figures, metrics, independent validity)")
    sp.add_argument("--run", required=True, help="run directory")
    sp.add_argument("--catalog", default=None, help="catalog directory (with catalog.h5) to summarise")
    sp.add_argument("--out", default=None, help="HTML file (default RUN/report/report.html; PNGs next to it)")
    sp.add_argument("--max-galaxies", type=int, default=1000, help="galaxies of the split analysed (loader order)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--no-tsne", action="store_true", help="skip the t-SNE embeddings")
    sp.set_defaults(func=cmd_report)
    from .scaling.commands import add_scaling_parser

    add_scaling_parser(sub)  # galcf_hpc/scaling/commands.py
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .progress import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.func(args)
    except GalcfError as exc:
        print(f"galcf-hpc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("galcf-hpc: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
