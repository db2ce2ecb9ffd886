"""``galcf-hpc``: the command line. Subcommands call into the package modules; this is the
only place (with config.py) that parses arguments."""

import argparse
import logging
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


def cmd_demo(args):
    from .config import load_config
    from .data.classes import NUM_CLASSES
    from .data.galaxy10 import write_catalog
    from .data.shards import write_shards
    from .data.synth import generate
    from .explain.run import explain
    from .progress import Progress
    from .train.loop import train

    config = Path(args.config) if args.config else REPO_CONFIGS / "smoke.yaml"
    cfg = load_config(config, args.set or [])
    t0 = time.monotonic()
    source, shards = Path(cfg.data.source), Path(cfg.data.shards)
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
    result = train(cfg, resume=True)
    t_train = time.monotonic() - t0
    summary = explain(cfg.run.out_dir, split=cfg.explain.split)
    print(f"\n== galcf-hpc demo ({config.name}) finished in {time.monotonic() - t0:.0f} s "
          f"(data + training {t_train:.0f} s) ==")
    print(f"validation accuracy {result['accuracy']:.3f} (eval.json)")
    _print_explain(summary)


def _mpi_world():
    """COMM_WORLD when started by an MPI launcher with more than one rank, else None."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None


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

    sp = sub.add_parser("demo", help="synthesise -> shard -> train -> explain on the smoke config")
    with_config(sp, required=False)
    sp.set_defaults(func=cmd_demo)
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
