"""``galcf-hpc``: the command line. Subcommands call into the package modules (pipelines in
demo.py); this is the only place (with config.py) that parses arguments."""

import argparse
import faulthandler
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import GalcfError, LaunchError, UsageError

log = logging.getLogger("galcf_hpc")

DESCRIPTION = (
    "Explainable galaxy-morphology classification with counterfactual explanations (Cao, Krieger, "
    "Scharr & Assent, NeurIPS 2024 ML4PS), built to train on many GPUs and explain whole sky catalogs: "
    "synthesise or shard data, train (one process per GPU under srun, torchrun or mpiexec), explain, "
    "run the catalog job, build reports."
)
EPILOG = (
    "Start with `galcf-hpc demo` (CPU only, minutes); `galcf-hpc COMMAND --help` for each command. "
    "Exit codes: 0 success, 1 a bug (traceback), 2 usage, 3 configuration, 4 data, 5 checkpoint, "
    "6 distributed job (a lost peer or launcher), 7 the machine (GPU, driver, device memory), 130 interrupted."
)
# device.DEVICES, written out so that --help does not import torch (tests/test_cli.py checks they agree)
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _load(args):
    from .config import load_config

    return load_config(args.config, args.set or [])


def cmd_synth(args):
    from .data.classes import NUM_CLASSES, plant_label_noise
    from .data.galaxy10 import TRUE_LABELS_KEY, write_catalog
    from .progress import Progress

    noise = args.label_noise
    if noise is not None and not 0.0 <= noise < 0.5:  # NaN fails too
        raise UsageError(
            f"--label-noise {noise}: the fraction of galaxies whose label is moved must be in [0, 0.5) "
            "(e.g. 0.08); at 0.5 or more the wrong labels would outnumber the right ones"
        )
    fractions = [1.0 / NUM_CLASSES] * NUM_CLASSES if args.balanced else None
    if args.renderer == "analytic":
        # numpy models that share no code with the GalSim generator (data/analytic.py); one process
        from .data.analytic import render_catalog

        try:
            cat = render_catalog(
                args.n, args.size, args.seed, class_fractions=fractions, progress=Progress(args.n, "synth")
            )
        except ValueError as exc:
            raise UsageError(f"data synth --renderer analytic: {exc}") from None
        generator = f"galcf-hpc {__version__} analytic synthetic (numpy, no GalSim)"
    else:
        from .data.synth import generate

        cat = generate(
            args.n,
            args.size,
            args.seed,
            workers=args.workers,
            class_fractions=fractions,
            progress=Progress(args.n, "synth"),
        )
        generator = f"galcf-hpc {__version__} GalSim synthetic"
    attrs = {"generator": generator, "seed": args.seed, "renderer": args.renderer}
    moved = None
    if noise is not None:
        # after rendering: the images are those of the true classes, only the catalogue labels move
        cat["ans_true"] = cat["ans"]
        cat["ans"], moved = plant_label_noise(cat["ans"], noise, args.seed)
        attrs |= {"label_noise": noise, "label_noise_moved": len(moved)}
    write_catalog(args.out, **cat, attrs=attrs)
    print(f"wrote {args.n} synthetic galaxies ({args.size} px, {args.renderer} renderer) to {args.out}")
    if moved is not None:
        print(
            f"label noise {noise:g}: moved the labels of {len(moved)} of {args.n} galaxies to a neighbouring "
            f"class (data/classes.py NEIGHBOURS); 'ans' holds the labels training sees, '{TRUE_LABELS_KEY}' the "
            "true ones"
        )


def cmd_shard(args):
    from .data.shards import DEFAULT_JPEG_QUALITY, image_encoding, write_shards
    from .progress import Progress

    # the config's data section (if any) gives the defaults; options on the command line win
    d = _load(args).data if args.config else None
    source = args.input or (d.source if d else None)
    args.out = args.out or (d.shards if d else None)
    if not source or not args.out:
        raise UsageError("data shard needs --input and --out, or --config naming data.source and data.shards")
    fractions = args.fractions or (tuple(d.split_fractions) if d else (0.8, 0.1, 0.1))
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise UsageError(f"--fractions {fractions}: three non-negative numbers (train, val, test) summing to 1")

    def pick(option, key, default):
        return option if option is not None else (getattr(d, key) if d else default)

    image_format = pick(args.image_format, "image_format", "png")
    if args.jpeg_quality is not None and image_format not in ("jpeg", "jpg"):
        raise UsageError(f"--jpeg-quality applies to --image-format jpeg only; the image format is {image_format}")
    jpeg_quality = pick(args.jpeg_quality, "jpeg_quality", DEFAULT_JPEG_QUALITY)
    try:
        image_encoding(image_format, jpeg_quality)
    except ValueError as exc:
        raise UsageError(f"--jpeg-quality: {exc}") from None
    summary = write_shards(
        source,
        args.out,
        shard_size=pick(args.shard_size, "shard_size", 1000),
        fractions=tuple(fractions),
        seed=pick(args.seed, "split_seed", 0),
        image_format=image_format,
        jpeg_quality=jpeg_quality,
        progress=Progress(1, "shard"),
        match_radius_arcsec=pick(args.match_radius, "match_radius_arcsec", 10.0),
        overwrite=args.overwrite,
    )
    for split, info in summary["splits"].items():
        print(f"{split:5s}: {info['num_samples']} galaxies in {info['num_shards']} shards")
    conflicts = summary["conflicting_groups"]
    if conflicts:
        print(
            f"{len(conflicts)} groups of repeated cutouts carry conflicting labels (kept in one split each; "
            f"listed in {Path(args.out) / 'splits.json'})"
        )
    quality = summary["jpeg_quality"]
    images = f"{summary['image_format']} images, " + (f"quality {quality}" if quality else "lossless")
    print(f"wrote {args.out} ({images}); check it with `galcf-hpc data verify {args.out}`")


def cmd_verify(args):
    from .data.shards import verify_shards
    from .progress import Progress

    counts = verify_shards(args.dir, progress=Progress(1, "verify"))
    print(f"OK: {args.dir} verified ({', '.join(f'{k} {v}' for k, v in counts.items())})")


def cmd_train(args):
    from .train.loop import train

    cfg = _load(args)
    result = train(cfg, resume=args.resume, resume_from=args.resume_from)
    if result is not None:  # rank 0 of a finished run; other ranks and stopped runs print nothing more
        _print_eval(result)


def cmd_explain(args):
    from .data.classes import parse_class_list
    from .explain.run import explain

    try:
        targets = parse_class_list(args.targets)
    except ValueError as exc:
        raise UsageError(f"--targets: {exc}") from None
    summary = explain(
        args.run,
        split=args.split,
        targets=targets,
        max_galaxies=args.max_galaxies,
        device=args.device,
        checkpoint=args.checkpoint,
        placement=args.placement,
    )
    _print_explain(summary)


def cmd_weights_fetch(args):
    from .model.weights import fetch_vgg16

    path = fetch_vgg16(args.out)
    where = (
        "training finds it there when model.vgg_weights is not set"
        if args.out is None
        else f"set model.vgg_weights: {path}"
    )
    print(f"VGG16 ImageNet weights saved to {path}; {where}")


def cmd_config(args):
    from .config import dump_config, explain_key

    if args.explain:
        print(explain_key(args.explain, _load(args) if args.config else None))
        return
    if not args.config:
        raise UsageError("config needs --config C (print it resolved) or --explain KEY")
    print(dump_config(_load(args)), end="")


def cmd_demo(args):
    from .demo import run_demo

    r = run_demo(args.config, args.set, ranks=args.ranks, judge_epochs=args.judge_epochs)
    print(
        f"\n== galcf-hpc demo ({r['config'].name}, {r['ranks']} training rank(s)) finished in "
        f"{r['total_seconds']:.0f} s =="
    )
    print("  " + ", ".join(f"{k} {v:.0f} s" for k, v in r["times"].items()))
    print(f"validation accuracy {r['train']['accuracy']:.3f} (eval.json)")
    _print_explain(r["explain"])
    _print_report(r["report"])


def _print_report(rep):
    from .report import summary_lines

    print("\n".join(summary_lines(rep)))


def cmd_judges_train(args):
    from .judges import train_judges

    cfg = _load(args)
    results = train_judges(cfg, names=args.only, device=args.device, epochs=args.epochs)
    for name, r in results.items():
        print(
            f"judge {name} ({r['model']}; {r['settings']['epochs']} epochs, {r['train_seconds']:.0f} s): "
            f"{r['split']} accuracy {r['accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}  "
            f"({r['num_galaxies']} galaxies)"
        )
    print(f"wrote {Path(cfg.run.out_dir) / 'judges'}/<judge>/model.pt, eval.json and panel.json")


def cmd_judges_check(args):
    from .device import inference_autocast, resolve_device
    from .judges.check import Classifier, check_panel, summary_lines
    from .train.checkpoint import latest_checkpoint

    cfg = _load(args)
    dev = resolve_device(args.device)
    extra = []
    if latest_checkpoint(cfg.run.out_dir) is not None:  # the run's model too, next to its judges
        from .explain.run import load_run

        model, mcfg, ckpt = load_run(cfg.run.out_dir, device=dev)

        def model_class(x):
            with inference_autocast(dev, mcfg.train):  # as explain, report and catalog classify
                return model.classify(x).pred

        extra.append(
            Classifier(
                "model",
                model_class,
                mcfg.data.image_size,
                mcfg.data.crop_fraction,
                "model",
                f"galcf-hpc model, {ckpt} (trained against its own critics, not a judge)",
            )
        )
    summary = check_panel(cfg, args.data, device=dev, out=args.out, extra=extra)
    print("\n".join(summary_lines(summary)))


def cmd_report(args):
    from .report import build_report

    rep = build_report(
        args.run,
        catalog=args.catalog,
        out=args.out,
        max_galaxies=args.max_galaxies,
        device=args.device,
        tsne=not args.no_tsne,
    )
    _print_report(rep)


def _mpi_world():
    """COMM_WORLD when started by an MPI launcher with more than one rank, else None."""
    sizes = ("SLURM_STEP_NUM_TASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    launched = max(int(os.environ.get(k, "1") or 1) for k in sizes)
    try:
        from mpi4py import MPI
    except ImportError:
        MPI = None
    size = MPI.COMM_WORLD.Get_size() if MPI else 1
    if launched > 1 and size == 1:
        # every task would explain the whole catalog on its own
        raise LaunchError(
            f"the launcher started {launched} tasks but each sees an MPI world of size 1"
            f"{'' if MPI else ' (mpi4py is not installed)'}: srun's MPI plug-in does not match the MPI "
            "of mpi4py. On JSC systems (psslurm) build mpi4py against the loaded MPI module and use "
            "`srun --mpi=pspmix` or psslurm's default (pmi2 settings do nothing there); on stock Slurm "
            "with the pip mpich wheel use `srun --mpi=pmi2` (or MpiDefault=pmi2)"
        )
    return MPI.COMM_WORLD if size > 1 else None


def cmd_catalog_run(args):
    from .catalog.job import RankStopped, run_catalog

    comm = _mpi_world()
    try:
        s = run_catalog(
            args.checkpoint,
            args.input,
            args.out,
            targets=args.targets,
            unit_size=args.unit_size,
            device=args.device,
            image_dtype=args.image_dtype,
            images=args.images,
            comm=comm,
            kill_at_unit=args.fault_kill_at_unit,
        )
    except RankStopped as exc:
        sys.exit(exc.exit_code)  # rank 0 reports the reason once
    if comm and comm.Get_rank():
        return
    print(
        f"catalog: {s['num_galaxies']} galaxies in {s['num_units']} units: {s['skipped_units']} finished "
        f"before (skipped), {s['computed_units']} computed on {s['ranks']} rank(s), {s['device']}"
    )
    for r in s["per_rank"]:
        print(
            f"  rank {r['rank']}: {r['units']} units, {r['galaxies']} galaxies, {r['seconds']:.1f} s, "
            f"{r['galaxies_per_s']:.2f} galaxies/s"
        )
    print(f"wrote {s['catalog']}; check it with `galcf-hpc catalog verify {Path(s['catalog']).parent}`")


def cmd_catalog_render(args):
    from .catalog.render import render, write_strip
    from .data.classes import CLASS_NAMES, parse_class_list

    try:
        targets = None if args.target is None else parse_class_list(args.target)
    except ValueError as exc:
        raise UsageError(f"--target: {exc}") from None
    r = render(args.dir, args.key, args.index, targets, args.device, args.checkpoint)
    out = args.out or Path(f"{r['key'].replace('/', '_')}_counterfactuals.png")
    write_strip(r["images"], out)
    names = ", ".join(f"{CLASS_NAMES[t]}{' (x~, its own class)' if t == r['pred'] else ''}" for t in r["targets"])
    print(
        f"galaxy {r['key']} (row {r['index']}, predicted {CLASS_NAMES[r['pred']]}): wrote {out}, left to right: {names}"
    )


def cmd_catalog_pack(args):
    from .catalog.job import verify_catalog
    from .catalog.store import CATALOG, pack_catalog
    from .progress import Progress

    verify_catalog(args.dir, Progress(1, "verify parts"))  # never pack a catalog with holes
    out = args.out or args.dir / "catalog_packed.h5"
    n = pack_catalog(args.dir / CATALOG, out, progress=Progress(1, "pack"))
    print(f"packed {n} galaxies into {out} (one file, no part files needed)")


def cmd_catalog_export(args):
    from .catalog.export import default_out, export_catalog
    from .progress import Progress

    out = args.out or default_out(args.dir, args.format)
    s = export_catalog(args.dir, out, args.format, progress=Progress(1, f"export {args.format}"))
    also = f"; provenance and column descriptions in {s['sidecar']}" if s["sidecar"] else ""
    print(f"exported {s['rows']} galaxies ({s['columns']} columns, no images) to {out}{also}")


def cmd_catalog_verify(args):
    from .catalog.job import verify_catalog
    from .progress import Progress

    s = verify_catalog(args.dir, Progress(1, "verify parts"))
    for note in s["notes"]:
        print(f"note: {note}")
    print(
        f"OK: {args.dir}: {s['num_galaxies']} galaxies, {s['num_units']} parts, {len(s['targets'])} targets; "
        "every input key once, no fill values, provenance consistent"
    )


def _num(x, digits=3):
    """A value for the terminal; None (a metric without cases) as n/a. Not report.render.num:
    train and explain print without the report's dependencies (jinja2)."""
    return "n/a" if x is None else f"{x:.{digits}f}" if abs(x) >= 10**-digits or x == 0 else f"{x:.2e}"


def _print_eval(result):
    print(
        f"{result['split']} accuracy {_num(result['accuracy'])}  macro-F1 {_num(result['macro_f1'])}  "
        f"({result['num_galaxies']} galaxies)"
    )
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:26s} {_num(acc)}")


def _print_explain(summary):
    o = summary["overall"]
    _print_eval(summary)
    print(
        f"counterfactuals ({summary['split']}, {summary['num_galaxies']} galaxies, {o['n']} counterfactuals): "
        f"SSIM(x_cf, x~) {_num(o['ssim_rec'])}  MSD(x_cf, x~) {_num(o['msd_rec'], 5)}  "
        f"SSIM(x_cf, x) {_num(o['ssim_input'])}  luminance share {_num(o['luminance_share'])}  "
        f"background/centre change {_num(o['background_msd'])}/{_num(o['center_msd'])}"
    )
    # DESIGN.md: validity by the model (trained against) is necessary, never sufficient; the
    # judges' validity (nothing trained against them) stands next to it
    names = summary["judge_names"]
    print(
        f"counterfactual validity: by the model {_num(o['validity_model'])} (trained against); "
        + (
            "judged by "
            + ", ".join(f"{n} {_num(o[f'validity_{n}'])}" for n in names)
            + f"; panel mean {_num(o['validity_panel'])}"
            if names
            else "judged by: no judges"
        )
    )
    if summary["judge_note"]:
        print(f"note: {summary['judge_note']}")
    rec = summary["reconstruction"]
    print(f"reconstruction x~ vs input x: MSD {_num(rec['msd'], 5)}  SSIM {_num(rec['ssim'])}")
    on_recon = summary.get("judges_on_reconstructions") or {}
    if on_recon:
        print(
            "judges' accuracy on x~ (what a counterfactual can show them at most): "
            + ", ".join(f"{n} {_num(c['accuracy'])}" for n, c in on_recon.items())
        )
    print(
        f"written: {Path(summary['run']) / 'counterfactuals.json'}, "
        "counterfactual_grid.png, decoded_grid.png, saliency_grid.png, colour_grid.png"
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, except where there is nothing to show
    (no default, a flag) or the help text says it already."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose sub-commands (also those registered elsewhere) show defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _command(sub, name, help, description=None):
    """A sub-command with a one-line ``help`` (in the list of commands) and a ``description``
    (at the top of its own --help; default: the one-line help)."""
    sp = sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")
    # -v after the command too (`galcf-hpc train -v ...`); SUPPRESS keeps an earlier -v
    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return sp


def _with_config(sp, required=True, default_help=None):
    sp.add_argument(
        "--config",
        required=required,
        help="YAML run configuration" + (f" (default: {default_help})" if default_help else ""),
    )
    sp.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=5 (repeatable)"
    )


def _device(sp, what):
    sp.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default="auto",
        help=f"where {what} runs; auto: a GPU when one is visible, else the CPU",
    )


def build_parser():
    p = _Parser(prog="galcf-hpc", description=DESCRIPTION, epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"galcf-hpc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    data = _command(
        sub,
        "data",
        "synthesise, shard and verify data",
        "Turn a Galaxy10-format catalog (astroNN .h5, real or rendered with GalSim) into "
        "WebDataset shards with DALI index files and manifests, and check them.",
    ).add_subparsers(dest="data_cmd", required=True, metavar="COMMAND")
    sp = _command(
        data,
        "synth",
        "render a Galaxy10-like catalog with GalSim or the analytic renderer (astroNN .h5 format)",
        "Render synthetic galaxies of the ten Galaxy10 classes with GalSim (default) or with an "
        "independent analytic numpy renderer, and write them in the astroNN Galaxy10 .h5 format "
        "(images, ans, ra, dec, redshift, pxscale).",
    )
    sp.add_argument("--out", required=True, help="astroNN-format .h5 file to write")
    sp.add_argument("--n", type=int, required=True, help="number of galaxies")
    sp.add_argument("--size", type=int, default=64, help="image size in pixels")
    sp.add_argument("--seed", type=int, default=0, help="random seed (same seed, same catalog)")
    sp.add_argument(
        "--renderer",
        choices=("galsim", "analytic"),
        default="galsim",
        help="galsim: the training generator; analytic: numpy models sharing no code with it, for "
        "checking classifiers on galaxies they have never seen (`judges check`)",
    )
    sp.add_argument("--workers", type=int, default=2, help="rendering processes (galsim only; analytic uses one)")
    sp.add_argument("--balanced", action="store_true", help="equal class fractions instead of Galaxy10's")
    sp.add_argument(
        "--label-noise",
        type=float,
        metavar="P",
        help="move the labels of round(P n) galaxies (seeded, P in [0, 0.5)) to a confusable neighbouring class "
        "after rendering; 'ans' gets the noisy labels, 'ans_true' keeps the true ones (to measure how well the "
        "report's mislabel candidates find them)",
    )
    sp.set_defaults(func=cmd_synth)
    sp = _command(
        data,
        "shard",
        "split an astroNN .h5 into WebDataset shards + DALI index + manifests",
        "Split an astroNN-format catalog into train/val/test (repeated cutouts of one galaxy "
        "stay in one split) and write each split as WebDataset tars with DALI index files, "
        "a manifest (counts, sha256) and splits.json.",
    )
    sp.add_argument("--config", help="take data.source, data.shards, shard size and split settings from this config")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    sp.add_argument(
        "--input", help="astroNN-format .h5 catalog (Galaxy10 DECaLS or `data synth`; default: data.source of --config)"
    )
    sp.add_argument("--out", help="output directory, one subdirectory per split (default: data.shards of --config)")
    sp.add_argument("--shard-size", type=int, help="galaxies per tar (default: data.shard_size of --config, else 1000)")
    sp.add_argument(
        "--seed", type=int, help="seed of the train/val/test split (default: data.split_seed of --config, else 0)"
    )
    sp.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        metavar=("TRAIN", "VAL", "TEST"),
        help="split fractions (default: data.split_fractions of --config, else 0.8 0.1 0.1)",
    )
    sp.add_argument(
        "--match-radius",
        type=float,
        metavar="ARCSEC",
        help="cutouts closer than this share a split (default: data.match_radius_arcsec of --config, else 10)",
    )
    sp.add_argument(
        "--image-format",
        "--format",
        choices=("png", "jpeg", "jpg", "jp2"),
        help="image encoding: png or jp2 (JPEG 2000), both lossless, or jpeg (lossy, --jpeg-quality); "
        "default: data.image_format of --config, else png (docs/loaders.md: image formats)",
    )
    sp.add_argument(
        "--jpeg-quality",
        type=int,
        metavar="Q",
        help="JPEG quality 1-100 for --image-format jpeg (default: data.jpeg_quality of --config, else 95)",
    )
    sp.add_argument(
        "--overwrite", action="store_true", help="replace shards of another catalog already in the output directory"
    )
    sp.set_defaults(func=cmd_shard)
    sp = _command(
        data,
        "verify",
        "re-check shards, index files and manifests",
        "Re-read every shard of a directory written by `data shard`: sha256 against the "
        "manifest, index files against the tars, every key once.",
    )
    sp.add_argument("dir", help="shard directory written by `data shard`")
    sp.set_defaults(func=cmd_verify)

    sp = _command(
        sub,
        "train",
        "train the model on every rank the launcher started (srun, torchrun, mpiexec)",
        "Train the model of a configuration. Started plainly it is one process; under srun, "
        "torchrun or mpiexec every process is one rank (one GPU each) of a DDP or DeepSpeed "
        "job (train.engine). Checkpoints land in run.out_dir; SIGUSR1/SIGTERM stop cleanly "
        "with a checkpoint.",
    )
    _with_config(sp)
    sp.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest readable checkpoint of run.out_dir (a damaged newer one is skipped)",
    )
    sp.add_argument(
        "--resume-from",
        metavar="STEP|FILE",
        help="continue from this step number or checkpoints/step-*.pt of run.out_dir (implies --resume)",
    )
    sp.set_defaults(func=cmd_train)

    sp = _command(
        sub,
        "explain",
        "counterfactuals and their metrics for a split of a trained run",
        "Classify every galaxy of a split with a trained run and compute its counterfactuals "
        "towards the target classes; writes RUN/counterfactuals.json and the figure grids.",
    )
    sp.add_argument("--run", required=True, help="run directory (with checkpoints/)")
    sp.add_argument("--split", default=None, help="split to explain (default: the run's explain.split)")
    sp.add_argument("--targets", default="all", help="all, or class names/numbers separated by commas")
    sp.add_argument("--max-galaxies", type=int, default=None, help="only the first N galaxies (default: all)")
    _device(sp, "the model")
    sp.add_argument("--checkpoint", default=None, help="a checkpoint file (default: the run's newest)")
    sp.add_argument(
        "--placement",
        default=None,
        help="where h_cf lands: boundary (margin past it), translate (h - mu_p + mu_t) or a number alpha in "
        "[0, 1] between them (default: the run's explain.placement)",
    )
    sp.set_defaults(func=cmd_explain)

    catalog = _command(
        sub,
        "catalog",
        "counterfactuals for a whole catalog (MPI batch job) -> HDF5",
        "Predict and explain every galaxy of a catalog with an MPI batch job (one rank per "
        "GPU, resumable work units) and write one HDF5 catalog.",
    ).add_subparsers(dest="catalog_cmd", required=True, metavar="COMMAND")
    sp = _command(
        catalog,
        "run",
        "run or resume the job (start with mpiexec -n N / srun; one rank per GPU)",
        "Run or resume the catalog job: work units of --unit-size galaxies are shared out to "
        "the MPI ranks, each written as a part file; finished units are skipped on restart. "
        "Writes OUT/catalog.h5 (a virtual dataset over the parts) and OUT/run.json.",
    )
    sp.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory (newest checkpoint)")
    sp.add_argument(
        "--input",
        required=True,
        help="shard split directory (e.g. shards/test), astroNN .h5, a folder of cutouts (.png, .jpg, .fits, "
        "subfolders included) or a .csv/.parquet list of cutout files (column path; optional id, ra, dec, label)",
    )
    sp.add_argument("--out", required=True, help="output directory (parts/, catalog.h5, run.json)")
    sp.add_argument("--targets", default="all", help="all, or class names/numbers separated by commas")
    sp.add_argument(
        "--unit-size",
        type=int,
        default=None,
        help="galaxies per work unit and part file (default: from the input's size and the ranks, "
        "256 to 32768, at most 1024 parts; a resumed run keeps its own; docs/catalog.md)",
    )
    _device(sp, "the model")
    sp.add_argument(
        "--images",
        choices=("auto", "none", "thumbnails", "full"),
        default="auto",
        help="counterfactual images to store: none (render them with `catalog render`), thumbnails "
        "(a quarter of the side, at least 16 px), full; auto: full up to 4 GiB of images, else none",
    )
    sp.add_argument("--image-dtype", choices=("uint8", "float16"), default="uint8", help="storage type of full images")
    sp.add_argument("--fault-kill-at-unit", type=int, default=None, help=argparse.SUPPRESS)  # restart tests
    sp.set_defaults(func=cmd_catalog_run)
    sp = _command(
        catalog,
        "render",
        "recompute one galaxy's counterfactual images from a catalog and its checkpoint",
        "Recompute the counterfactuals of one galaxy of a catalog from its stored z and h and "
        "the catalog's checkpoint (sha256 checked): byte for byte what `catalog run --images full` "
        "stores, on the same kind of device. Writes a PNG strip, one image per target.",
    )
    sp.add_argument("dir", type=Path, help="catalog directory written by `catalog run`")
    sp.add_argument("--key", default=None, help="the galaxy's key (as in the catalog's key column)")
    sp.add_argument("--index", type=int, default=None, help="the galaxy's row instead of its key")
    sp.add_argument("--target", default=None, help="target classes (names/numbers, commas; default: all)")
    sp.add_argument("--out", type=Path, default=None, help="PNG file (default: KEY_counterfactuals.png)")
    sp.add_argument("--checkpoint", default=None, help="the catalog's checkpoint where it was moved to")
    sp.add_argument("--device", default="cpu", help="cpu, or the device kind the catalog was made on (cuda)")
    sp.set_defaults(func=cmd_catalog_render)
    sp = _command(
        catalog,
        "pack",
        "verify, then copy catalog.h5 into one self-contained file (no parts)",
        "Verify a finished catalog, then copy it into one self-contained HDF5 file that needs "
        "no part files (for sharing).",
    )
    sp.add_argument("dir", type=Path, help="catalog directory written by `catalog run`")
    sp.add_argument("--out", type=Path, help="packed file (default: DIR/catalog_packed.h5)")
    sp.set_defaults(func=cmd_catalog_pack)
    sp = _command(
        catalog,
        "export",
        "one table for TOPCAT, astropy, pandas: Parquet, FITS or CSV (no images)",
        "Write every field of a catalog except the images as one columnar table (Parquet, "
        "FITS binary table or CSV) with units, column descriptions, class and target names "
        "and provenance; vector fields (per class, per target, h, z) as vector columns, in "
        "CSV one column per element. Part files are checked first; the file appears only "
        "when complete.",
    )
    sp.add_argument(
        "dir", type=Path, help="catalog directory written by `catalog run` (or its catalog.h5, or a packed file)"
    )
    sp.add_argument(
        "--format",
        required=True,
        choices=("parquet", "fits", "csv"),
        help="parquet (pandas, TOPCAT), fits (astropy, TOPCAT) or csv (anything; provenance in OUT.json)",
    )
    sp.add_argument(
        "--out", type=Path, help="table to write (default: DIR/catalog.<format>; next to a given file, its name)"
    )
    sp.set_defaults(func=cmd_catalog_export)
    sp = _command(
        catalog,
        "verify",
        "check a catalog directory: every key once, no holes, provenance",
        "Check a catalog directory: every input key exactly once, no fill values, provenance "
        "(config, checkpoint hash, version) consistent across parts.",
    )
    sp.add_argument("dir", help="catalog directory written by `catalog run`")
    sp.set_defaults(func=cmd_catalog_verify)

    weights = _command(
        sub,
        "weights",
        "VGG16 weights for the perceptual loss",
        "Get torchvision's ImageNet VGG16 file for the perceptual loss (compute nodes "
        "usually have no internet: fetch on a login node).",
    ).add_subparsers(dest="weights_cmd", required=True, metavar="COMMAND")
    sp = _command(
        weights,
        "fetch",
        "download torchvision's VGG16 ImageNet weights (needs internet)",
        "Download torchvision's vgg16-397923af.pth, check its sha256 prefix and move it into place only when complete.",
    )
    sp.add_argument(
        "--out",
        default=None,
        help="file or directory to write (default: the torch hub cache, "
        "$TORCH_HOME/hub/checkpoints/, where training finds it when model.vgg_weights is not set)",
    )
    sp.set_defaults(func=cmd_weights_fetch)

    sp = _command(
        sub,
        "config",
        "print the resolved configuration (validates it), or explain a key",
        "Load a configuration with its overrides, validate it and print it resolved, as it "
        "will be written next to every output. With --explain KEY: what the key means, its type, "
        "default and allowed values (and its value in --config, if given); a section name "
        "(e.g. train) lists all its keys.",
    )
    _with_config(sp, required=False)
    sp.add_argument("--explain", metavar="KEY", help="explain a config key (e.g. train.lr) or list a section's keys")
    sp.set_defaults(func=cmd_config)

    sp = _command(
        sub,
        "demo",
        "the whole pipeline on this machine: data -> judges -> train -> catalog -> explain and report",
        "Synthesise galaxies with GalSim, shard them, train the judge panel, train on local ranks, "
        "run the catalog job (mpiexec), then explain a split (explain.split) and write the HTML "
        "report from one pass over it. Stages whose output exists are reused. With "
        "run.demo_minutes the model's training gets what the other stages leave of that budget.",
    )
    _with_config(sp, required=False, default_help="configs/smoke.yaml")
    sp.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="local training processes (default: 2, or 1 on one core; at most one per visible GPU)",
    )
    sp.add_argument("--judge-epochs", type=int, default=None, help=argparse.SUPPRESS)  # quick tests
    sp.set_defaults(func=cmd_demo)

    judges = _command(
        sub,
        "judges",
        "the judge panel: independent classifiers that check counterfactuals",
        "Classifiers trained on the same data but never trained against (two architecture "
        "families, one on luminance only): they judge whether a counterfactual looks like its "
        "target class to someone other than the model.",
    ).add_subparsers(dest="judges_cmd", required=True, metavar="COMMAND")
    sp = _command(
        judges,
        "train",
        "train the panel on the run's train split -> RUN/judges/",
        "Train the judges of the panel on the train split of a configuration's data; writes "
        "RUN/judges/<judge>/model.pt, eval.json and RUN/judges/panel.json.",
    )
    _with_config(sp)
    sp.add_argument("--only", nargs="+", metavar="JUDGE", help="train only these judges of the panel (default: all)")
    sp.add_argument("--epochs", type=int, default=None, help="epochs for every judge (default: each judge's own)")
    _device(sp, "training")
    sp.set_defaults(func=cmd_judges_train)
    sp = _command(
        judges,
        "check",
        "accuracy of the panel (and the run's model) on a labelled catalog it has never seen",
        "Classify every galaxy of a labelled astroNN-format .h5 (e.g. `data synth --renderer "
        "analytic`, galaxies of a renderer the run never saw) with every judge of RUN/judges and "
        "the run's newest checkpoint, after the evaluation transform (central crop, resize); "
        "prints accuracy, macro-F1 and per-class accuracy and writes them as JSON.",
    )
    _with_config(sp)
    sp.add_argument("--data", required=True, help="labelled astroNN-format .h5 catalog to classify")
    _device(sp, "classification")
    sp.add_argument("--out", default=None, help="JSON file to write (default: RUN/judges/check-<data file stem>.json)")
    sp.set_defaults(func=cmd_judges_check)

    sp = _command(
        sub,
        "report",
        "HTML report of a trained run (figures, metrics, independent validity)",
        "Write the HTML report of a trained run: classification metrics, counterfactual "
        "validity by the model and by the independent judges, figure grids, t-SNE, and a "
        "catalog summary.",
    )
    sp.add_argument("--run", required=True, help="run directory")
    sp.add_argument("--catalog", default=None, help="catalog directory (with catalog.h5) to summarise")
    sp.add_argument("--out", default=None, help="HTML file (default: RUN/report/report.html; PNGs next to it)")
    sp.add_argument("--max-galaxies", type=int, default=1000, help="galaxies of the split analysed (loader order)")
    _device(sp, "the model")
    sp.add_argument("--no-tsne", action="store_true", help="skip the t-SNE embeddings")
    sp.set_defaults(func=cmd_report)
    from .scaling.commands import add_scaling_parser

    add_scaling_parser(sub)  # galcf_hpc/scaling/commands.py
    return p


def main(argv=None):
    # A native abort (a communication library's thread, a decoder) still prints the Python
    # stack of every thread, so a failed rank's Slurm log shows where it was.
    try:
        faulthandler.enable()
    except (AttributeError, ValueError):  # stderr without a file descriptor: an in-process caller
        pass
    args = build_parser().parse_args(argv)
    from .progress import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.func(args)
    except GalcfError as exc:
        print(f"galcf-hpc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("galcf-hpc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
