"""The ``microsnoop-ray`` command: thin argument parsing around the library.

Every error about an input prints one line naming the file (or plate/well/site)
and the problem, and the command exits with status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import add_dataclass_arguments, given_options
from .errors import InputError, MicrosnoopError
from .pipeline.config import add_arguments
from .profiles.sphering import DEFAULT_REGULARIZATION as REGULARIZATION_DEFAULT, REGULARIZATIONS, SCOPES

log = logging.getLogger("microsnoop_ray")


def _config(args: argparse.Namespace, require_inputs: bool = True):
    """The ProfileConfig of a command (its --config file, overridden by the flags that were given) and
    the options that were given, as nested sections."""
    from .config import load_config
    from .pipeline.config import ProfileConfig, merge_options, options_from_args

    options = options_from_args(args)
    inputs = getattr(args, "plates", None) or getattr(args, "images", None)
    if inputs:
        options["inputs"] = [str(p) for p in inputs]
    if getattr(args, "out", None) is not None:
        options["out"] = str(args.out)
    if getattr(args, "quiet", False):
        options.setdefault("run", {})["progress"] = False
    given = merge_options(load_config(args.config), options)
    try:
        return ProfileConfig.from_mapping(given, require_inputs), given
    except (TypeError, ValueError) as exc:
        raise InputError(args.config or "command line", str(exc)) from None


def _cmd_embed(args: argparse.Namespace) -> int:
    from .pipeline.embed_job import run_embed, summary_path

    cfg, given = _config(args, require_inputs=False)
    r = run_embed(args.input, args.out, cfg.encode, cfg.channel_names, args.metadata,
                  compile=cfg.encode.compile if "compile" in given.get("encode", {}) else None,
                  progress=not args.quiet, features=cfg.feature_sets, masks=args.masks)
    if not args.quiet:
        print(f"{' + '.join(r['features'])}: {r['images']} images x {r['channels']} channels in {r['seconds']:.1f} s "
              f"({r['images'] / max(r['seconds'], 1e-9):.1f} images/s, {r['model_id']}, {r['precision']}) -> {args.out}")
    if r["dropped"]:
        # said even with --quiet: a table of NaN measurements must not pass for a profiled set
        cp = r["cellprofiler"]
        most = cp["not_measured"] * 2 > r["images"]
        print(f"microsnoop-ray embed: {'WARNING: most images' if most else 'some images'} have no CellProfiler "
              f"measurements: {cp['not_measured']} of {r['images']} (Metadata_Dropped_Reason; counts in "
              f"{summary_path(args.out)}):", file=sys.stderr)
        for why, count in list(cp["not_measured_by_reason"].items())[:5]:
            print(f"  {count} x {why}", file=sys.stderr)
        return 3
    return 0


def _add_embed(sub) -> None:
    e = sub.add_parser("embed", help="embed images up to 224x224 (cells, crops) into a Parquet table",
                       description="Encoder flags as `profile` (and its --config file's encode section); "
                                   "--compile defaults to on from 512 one-channel images at input size 224. Writes OUT and "
                                   "OUT.summary.json. Exit status: 0 everything embedded and measured, 3 some "
                                   "images without CellProfiler measurements (Metadata_Dropped_Reason), 2 error.")
    e.add_argument("input", type=Path, help=".npy, .npz (key 'images') of shape (N, C, H, W), or a folder of TIFFs")
    e.add_argument("--out", type=Path, required=True, help="output .parquet")
    e.add_argument("--config", type=Path, default=None, help="YAML/TOML with an encode section (as `profile`)")
    e.add_argument("--metadata", type=Path, default=None, help="CSV/Parquet with one row per image (Metadata_ columns)")
    e.add_argument("--masks", type=Path, default=None, help="(N, H, W) label images of the cells (.npy/.npz), for "
                                                           "--features cellprofiler (default: the object nearest "
                                                           "each crop's centre)")
    add_arguments(e, ("encode",), top=("channel_names", "features"))
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_cmd_embed)


def _cmd_fields(args: argparse.Namespace) -> int:
    from .pipeline.fields_job import run_fields

    cfg, given = _config(args)
    if "out" not in given:
        raise InputError("fields", "give the output folder (--out, or 'out' in the config file)")
    result = run_fields(cfg, masks=args.masks, centres=args.centres, png=args.png,
                        progress_print=(lambda *a: None) if args.quiet else print)
    return 3 if result["skipped"] else 0


def _add_fields(sub) -> None:
    f = sub.add_parser("fields", help="profile whole fields of view in this process (cell crops, tiles or rescaling)",
                       description="The stages of `profile` without Ray, writing the same per-cell columns and "
                                   "skipped table. Inputs: image files (TIFF (C, H, W), PNG/JPEG, .npy), or any "
                                   "input of `profile`. Exit status: 0 all fields profiled, 3 some skipped "
                                   "(skipped.csv), 2 error.")
    f.add_argument("images", type=Path, nargs="*", help="one file per field (or 'inputs' in the config file)")
    f.add_argument("--out", type=Path, default=None, help="output folder")
    f.add_argument("--config", type=Path, default=None, help="YAML/TOML with any of these options (as `profile`)")
    f.add_argument("--masks", type=Path, nargs="+", default=None, help="label images, one per field, same order")
    f.add_argument("--centres", type=Path, default=None, help="CSV of object centres (CellProfiler columns)")
    f.add_argument("--png", action="store_true", help="write qc/<field>.png with outlines and crop windows")
    add_arguments(f, ("segmentation", "crop", "encode"), top=("channel_names", "batch", "cell_table", "features"))
    f.add_argument("-q", "--quiet", action="store_true")
    f.set_defaults(func=_cmd_fields)


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from .config import load_config
    from .train.config import TrainConfig
    from .train.loop import train_local, train_with_ray

    options = {**load_config(args.config), **given_options(args, TrainConfig)}
    try:
        cfg = TrainConfig.from_mapping(options)
    except (TypeError, ValueError) as exc:
        raise InputError(args.config or "command line", str(exc)) from None
    if args.ray:
        from .pipeline.executors import ray_runtime

        with ray_runtime(args.address, verbose=args.verbose):
            result = train_with_ray(cfg)
    else:
        result = train_local(cfg)
    card = result.get("model_card") or {}
    print(json.dumps({"weights_sha256": card.get("weights_sha256"), "model_id": card.get("model_id"),
                      "epochs": len(result.get("history", [])),
                      "loss": [round(h["loss"], 5) for h in result.get("history", [])]}))
    return 0


def _add_train(sub) -> None:
    from .train.config import TrainConfig

    t = sub.add_parser("train", help="masked-image pretraining (plain process or Ray Train)",
                       description="Every option can also be set in --config. Restarting with the same --name "
                                   "and --storage-path resumes from the last per-epoch checkpoint.")
    t.add_argument("--config", type=Path, default=None, help="YAML or TOML with the TrainConfig options")
    add_dataclass_arguments(t, TrainConfig)
    t.add_argument("--ray", action=argparse.BooleanOptionalAction, default=False,
                   help="run as a Ray Train TorchTrainer (default: one plain process)")
    t.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    t.set_defaults(func=_cmd_train)


def _cmd_profile(args: argparse.Namespace) -> int:
    from .pipeline.executors import ray_runtime
    from .pipeline.plate_job import run_profile

    cfg, _ = _config(args)
    with ray_runtime(args.address, args.num_cpus, args.verbose, args.object_store_mb):
        summary = run_profile(cfg, progress_print=(lambda *a: None) if args.quiet else print,
                              log_file=None if args.verbose else "default")
    out = Path(summary["out"])
    from .pipeline.run_report import write_run_report

    report = write_run_report(out, summary, color_by=cfg.treatment_keys[0] if cfg.treatment_keys else None)
    if not args.quiet:
        print(f"profiles in {out} (summary.json, skipped.csv, {report.name}/README.md); "
              f"{summary['skipped']} input(s) skipped")
    return 3 if summary["skipped"] else 0


def _add_profile(sub) -> None:
    pr = sub.add_parser("profile", help="profile plates end to end on Ray (cells -> sites -> wells -> treatments)",
                        description="Inputs: OME-Zarr HCS plates (NGFF 0.4/0.5), image tables (.parquet/.csv, "
                                    "load_data.csv columns) or cell arrays (.npz + cells.csv). Every option can "
                                    "also be set in --config (nested sections segmentation, crop, encode, "
                                    "sphering, run, or the flags' names). Rerunning the same command does only the "
                                    "missing sites. Exit status: 0 everything profiled, 3 something skipped "
                                    "(skipped.csv), 2 error.")
    pr.add_argument("plates", type=Path, nargs="*", help="inputs (or 'inputs' in the config file)")
    pr.add_argument("--out", type=Path, default=None, help="output root")
    pr.add_argument("--config", type=Path, default=None, help="YAML/TOML with any of these options")
    add_arguments(pr)
    pr.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else embedded Ray)")
    pr.add_argument("--num-cpus", dest="num_cpus", type=int, default=None, help="embedded Ray: CPUs (default all)")
    pr.add_argument("--object-store-mb", dest="object_store_mb", type=int, default=None)
    pr.add_argument("-q", "--quiet", action="store_true")
    pr.set_defaults(func=_cmd_profile)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .io.convert import convert_folder, convert_table

    if args.load_data:
        for p in convert_table(args.load_data, args.out, version=args.ngff):
            print(p)
        return 0
    if not (args.folder and args.pattern):
        raise InputError("convert", "give a folder with --pattern, or --load-data TABLE")
    names = None
    if args.channel_names:
        pairs = [c.split("=", 1) for c in args.channel_names.split(",")]
        names = {k: v for k, v in pairs} if all(len(p) == 2 for p in pairs) else [p[0] for p in pairs]
    out = args.out if args.out.suffix == ".zarr" else args.out / f"{args.plate or args.folder.name}.zarr"
    print(convert_folder(args.folder, args.pattern, out, plate=args.plate, channel_names=names, version=args.ngff))
    return 0


def _add_convert(sub) -> None:
    cv = sub.add_parser("convert", help="write an OME-Zarr plate from TIFFs + a file-name pattern, or load_data.csv")
    cv.add_argument("folder", type=Path, nargs="?", default=None)
    cv.add_argument("--pattern", default=None,
                    help=r"regex with groups well (or row, column), site, channel, e.g. '(?P<well>[A-P]\d\d)f(?P<site>\d\d)d(?P<channel>\d)'")
    cv.add_argument("--load-data", dest="load_data", type=Path, default=None, help="image table instead of a folder")
    cv.add_argument("--plate", default=None, help="plate name (default: the folder name)")
    cv.add_argument("--channel-names", dest="channel_names", default=None, help="token=name,... or names in order")
    cv.add_argument("--ngff", choices=("0.4", "0.5"), default="0.4")
    cv.add_argument("--out", type=Path, required=True, help="plate.zarr, or a folder for <plate>.zarr")
    cv.set_defaults(func=_cmd_convert)


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import json

    from .train.reconstruct import reconstruct_files

    print(json.dumps(reconstruct_files(args.images, args.out, args.weights, args.window, args.channel, args.size,
                                       args.mask_ratio, args.seed)))
    return 0


def _add_reconstruct(sub) -> None:
    rc = sub.add_parser("reconstruct", help="mask 25%% of 16x16 patches and reconstruct: PNG + masked-region MSE")
    rc.add_argument("images", type=Path, nargs="+", help="fields (TIFF/PNG/.npy); one 224 crop of each is used")
    rc.add_argument("--window", choices=("center", "busiest"), default="center",
                    help="which crop: the centre, or the window with the most structure")
    rc.add_argument("--weights", type=Path, default=None, help="full-network weights (default: the package's MAE network)")
    rc.add_argument("--out", type=Path, required=True, help="output PNG")
    rc.add_argument("--channel", type=int, default=0)
    rc.add_argument("--size", type=int, default=224)
    rc.add_argument("--mask-ratio", dest="mask_ratio", type=float, default=0.25)
    rc.add_argument("--seed", type=int, default=0)
    rc.set_defaults(func=_cmd_reconstruct)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from .evaluate import commands
    from .plots import embedding_png
    from .io.tables import read_table

    if args.metric == "suite":
        return _evaluate_suites(args)
    df = read_table(args.table)
    where = str(args.table)
    if args.metric == "knn":
        summary, X, y = commands.evaluate_knn(df, args.label, args.k, args.distance, where)
    elif args.metric == "mlp":
        summary, X, y = commands.evaluate_mlp(df, args.label, args.folds, args.seed, where)
    elif args.metric == "silhouette":
        summary, X, y = commands.evaluate_silhouette(df, args.label, args.distance, where)
    elif args.metric == "nsc":
        summary, X, y = commands.evaluate_nsc(df, args.moa, args.compound, args.concentration, args.batch_rule,
                                              args.sphere, args.distance, where,
                                              args.sphere_regularization
                                              or ("epsilon" if args.sphere_epsilon is not None else REGULARIZATION_DEFAULT),
                                              args.sphere_epsilon)
    else:
        summary, X, y = commands.evaluate_map(df, args.pert.split(","), args.question, not args.any_plate,
                                              args.null_size, args.seed, where)
    summary["input"] = where if "input" not in summary else f"{where} ({summary['input']})"
    if args.png:
        summary["figure"] = str(embedding_png(X, y, args.png, f"{args.table.name}: {args.metric}",
                                              method=args.picture))
    text = json.dumps(summary, indent=1, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text if not args.json else commands.headline(summary))
    return 0


def _add_evaluate(sub) -> None:
    ev = sub.add_parser("evaluate", help="evaluate profiles (kNN, MLP, NSC/NSCB, copairs mAP, silhouette) or run "
                                         "benchmark suites with baselines")
    evs = ev.add_subparsers(dest="metric", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("table", type=Path, help="profiles: Parquet/CSV with Metadata_* columns and features")
    common.add_argument("--json", type=Path, default=None, help="write the JSON summary here (else print it)")
    common.add_argument("--png", type=Path, default=None, help="write a 2-D map of the profiles coloured by label")
    common.add_argument("--picture", choices=["umap", "pca"], default="umap")
    common.add_argument("--seed", type=int, default=0)
    for name, helptext in (("knn", "leave-one-out kNN accuracy (docs/METHOD.md vote rule)"),
                           ("mlp", "MLPClassifier(max_iter=1000), stratified k-fold accuracy"),
                           ("silhouette", "silhouette score of the label groups")):
        q = evs.add_parser(name, parents=[common], help=helptext)
        q.add_argument("--label", required=True, help="the label column, e.g. Metadata_Phase")
        if name == "knn":
            q.add_argument("--k", type=int, default=11)
        if name == "mlp":
            q.add_argument("--folds", type=int, default=5)
        q.add_argument("--distance", choices=["euclidean", "cosine"],
                       default="cosine" if name == "silhouette" else "euclidean")
    q = evs.add_parser("nsc", parents=[common], help="BBBC021 NSC and NSCB (treatment or well profiles)")
    q.add_argument("--moa", default="Metadata_moa")
    q.add_argument("--compound", default="Metadata_Compound")
    q.add_argument("--concentration", default="Metadata_Concentration")
    q.add_argument("--batch-rule", dest="batch_rule", choices=["batch", "plate"], default="batch",
                   help="batch = Metadata_Batch (the week); plate = the reference's plate-string rule")
    q.add_argument("--sphere", choices=("none",) + SCOPES, default="none",
                   help="sphere well profiles on their negative controls first")
    q.add_argument("--sphere-regularization", choices=REGULARIZATIONS, default=None,
                   help="mean-eigenvalue (default), shrinkage (Ledoit-Wolf), epsilon (fixed), faithful (reference)")
    q.add_argument("--sphere-epsilon", type=float, default=None, help="with --sphere-regularization epsilon")
    q.add_argument("--distance", choices=["cosine", "euclidean"], default="cosine")
    q = evs.add_parser("map", parents=[common], help="copairs mAP: activity vs controls, or replicate consistency")
    q.add_argument("--pert", required=True, help="perturbation column(s), comma-separated")
    q.add_argument("--question", choices=["activity", "consistency"], default="activity")
    q.add_argument("--any-plate", dest="any_plate", action="store_true",
                   help="negatives are controls of any plate (default: the same plate)")
    q.add_argument("--null-size", dest="null_size", type=int, default=10000)
    q = evs.add_parser("suite", help="run benchmark suites through the shipped weights and every baseline")
    q.add_argument("suite", help="mlcp-cellcycle, bbbc021-chx, bbbc021-cp-profiles, lincs-plate, "
                                 "a comma-separated list, or all")
    q.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    q.add_argument("--out", type=Path, default=Path("evaluation"))
    q.add_argument("--methods", default="microsnoop,random_init,cp_measure,pixels_pca")
    q.add_argument("--weights", type=Path, default=None, help="weights of the microsnoop method (default: shipped)")
    q.add_argument("--per-class", dest="per_class", type=int, default=100)
    q.add_argument("--per-well", dest="per_well", type=int, default=40)
    q.add_argument("--null-size", dest="null_size", type=int, default=10000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)


def _evaluate_suites(args: argparse.Namespace) -> int:
    from .evaluate.commands import run_suites

    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        md = run_suites(args.suite, args.data, args.out, args.methods.split(","), args.weights, log=log,
                        per_class=args.per_class, per_well=args.per_well, seed=args.seed, null_size=args.null_size,
                        show=print)
    except ValueError as exc:
        raise MicrosnoopError(str(exc)) from None
    print(f"results in {args.out}; report {md}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .evaluate.report import collect_results, write_report

    if not collect_results(args.results):
        raise InputError(args.results, "no suite results (<suite>/result.json) here: run "
                                       "`microsnoop-ray evaluate suite all --out <folder>` first")
    md, page = write_report(args.results, args.out)
    print(f"wrote {md} and {page}")
    return 0


def _add_report(sub) -> None:
    rp = sub.add_parser("report", help="one Markdown/HTML page with the last result of every evaluation suite")
    rp.add_argument("--results", type=Path, default=Path("evaluation"))
    rp.add_argument("--out", type=Path, default=None, help="default: the results folder")
    rp.set_defaults(func=_cmd_report)


def _cmd_export(args: argparse.Namespace) -> int:
    from .pipeline.export import export

    for f in export(args.out, args.format, args.to, args.level, args.pca, args.pca_fit):
        print(f)
    return 0


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="export a profiling run as AnnData .h5ad or one single-cell Parquet per plate")
    ex.add_argument("out", type=Path, help="the output folder of `microsnoop-ray profile`")
    ex.add_argument("--format", required=True, choices=("h5ad", "plate-parquet"))
    ex.add_argument("--level", choices=("cells", "wells", "treatments"), default="cells")
    ex.add_argument("--pca", type=int, default=None, help="reduce to N principal components (e.g. MUSE's latent size)")
    ex.add_argument("--pca-fit", dest="pca_fit", choices=("all", "controls"), default="all",
                    help="fit the PCA on every row or on the negative controls")
    ex.add_argument("--to", type=Path, default=None, help="where to write (default: OUT/export)")
    ex.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="microsnoop-ray", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_embed, _add_fields, _add_train, _add_profile, _add_convert, _add_reconstruct, _add_evaluate,
                _add_report, _add_export):
        add(sub)
    return p


def _sigterm_as_interrupt():
    """SIGTERM (``ray job stop``, a batch scheduler) unwinds like Ctrl-C, so that clean-up code runs;
    finished sites stay written and a rerun of the same command does only what is missing.
    Returns the previous handler (None off the main thread)."""
    import signal
    import threading

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _raise)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = _sigterm_as_interrupt()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MicrosnoopError as exc:
        print(f"microsnoop-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"microsnoop-ray {args.command}: interrupted; rerun the same command to finish what is missing",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            import signal
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
