"""The `ctv2v` command line.

It is the outermost layer (configs -> data -> model -> steps -> DAG -> CLI), so it lives beside the DAG. Each
pipeline step is a subcommand that calls the same function in ctv2v.steps as the step's KFP component, with the
resolved config every step output carries, so `docker run IMAGE <step> --config resolved-config.yaml ...` (the
images' ENTRYPOINT is `ctv2v`) reruns one step of a pipeline run; `ctv2v pipeline rerun` prints that command.
Errors are one `ctv2v: error: <type>: <message>` on stderr, exit code 2 for a config error and 1 for any other;
--verbose shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctv2v.config import ConfigError, RunConfig
from ctv2v.config_io import add_config_arguments, config_from_args, load_config, to_yaml

BRANCHES = ("both", "main", "pretrained")
BASELINES_DATA_DIR = "baselines-data"
"""Under data.workspace: the staged dataset and preprocessing cache of `data baselines`. Not the pipeline's
`data` folder, because staging replaces `<data_dir>/dataset`, which a running pipeline may be reading."""


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2, default=str))


def _pipeline_run_id_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline-run-id", default=None, help="groups the MLflow runs of one pipeline run")


def _resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out, if any")


# ---------------------------------------------------------------------------------------- pipeline steps
def _prepare_data_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="prepared data folder (manifest, dataset, cache)")


def _prepare_data(args: argparse.Namespace) -> int:
    from ctv2v.steps.prepare_data import prepare_data_step

    _print_json(prepare_data_step(config_from_args(args), args.out).to_dict())
    return 0


def _fetch_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)
    parser.add_argument("--source", metavar="URI",
                        help="shorthand for --set vae.maisi.checkpoint=URI (clears the config's hashes)")
    hashes = parser.add_mutually_exclusive_group()
    hashes.add_argument("--sha256", metavar="HEX", help="shorthand for --set vae.maisi.sha256=HEX")
    hashes.add_argument("--md5", metavar="HEX", help="shorthand for --set vae.maisi.md5=HEX")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="checkpoint cache (default $CTV2V_CACHE/checkpoints or ~/.cache/ctv2v/checkpoints)")
    parser.add_argument("--out", required=True, type=Path, help="output folder: the checkpoint + fetch-record.json")


def _fetch_checkpoint(args: argparse.Namespace) -> int:
    from ctv2v.steps.fetch_checkpoint import fetch_checkpoint_step

    # After the user's own --set; JSON-quoted so YAML keeps them strings (an all-digit md5 would parse as a number).
    overrides = list(args.overrides)
    if args.source is not None:
        overrides += [f"vae.maisi.checkpoint={json.dumps(args.source)}", "vae.maisi.sha256=null", "vae.maisi.md5=null"]
    if args.sha256 is not None:
        overrides.append(f"vae.maisi.sha256={json.dumps(args.sha256)}")
    if args.md5 is not None:
        overrides.append(f"vae.maisi.md5={json.dumps(args.md5)}")
    config = load_config(args.config or [], overrides)
    _print_json(fetch_checkpoint_step(config, args.out, cache_dir=args.cache_dir).to_dict())
    return 0


def _match_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="checkpoint file, or the output folder of fetch-checkpoint")
    parser.add_argument("--data", required=True, type=Path,
                        help="prepared dataset folder (manifest + cache): val clips for the reconstruction check, "
                             "train clips for the latent scale")
    parser.add_argument("--out", required=True, type=Path, help="output folder: vae.pt, vae.json, match-report.json")
    parser.add_argument("--allow-partial", action="store_true",
                        help="shorthand for --set vae.maisi.allow_partial=true: load a partial match, labelled PARTIAL")
    _pipeline_run_id_argument(parser)


def _match(args: argparse.Namespace) -> int:
    from ctv2v.steps.match_architecture import match_architecture_step

    overrides = [*args.overrides, *(["vae.maisi.allow_partial=true"] if args.allow_partial else [])]
    summary = match_architecture_step(load_config(args.config or [], overrides), args.checkpoint, args.out,
                                      args.data, args.pipeline_run_id)
    _print_json(summary.to_dict())
    return 0


def _train_vae_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder (manifest + cache)")
    parser.add_argument("--out", required=True, type=Path, help="output folder: vae.pt, vae.json, checkpoints/")
    _resume_argument(parser)
    _pipeline_run_id_argument(parser)


def _train_vae(args: argparse.Namespace) -> int:
    from ctv2v.steps.train_vae import train_vae_step

    summary = train_vae_step(config_from_args(args), args.data, args.out, resume=args.resume,
                             pipeline_run_id=args.pipeline_run_id)
    _print_json(summary.to_dict())
    return 0


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--phase", required=True, choices=("frozen", "full"))
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder (manifest + cache)")
    parser.add_argument("--vae", required=True, type=Path, help="VAE artifact folder (train-vae / match-architecture)")
    parser.add_argument("--init", type=Path, default=None, help="--phase full: the frozen phase's output folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder (checkpoints, model, best-model)")
    _resume_argument(parser)
    _pipeline_run_id_argument(parser)


def _train(args: argparse.Namespace) -> int:
    from ctv2v.steps.train import train_step

    summary = train_step(config_from_args(args), args.phase, args.data, args.vae, args.init, args.out,
                         resume=args.resume, pipeline_run_id=args.pipeline_run_id)
    _print_json(summary.to_dict())
    return 0


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset folder (manifest + cache)")
    parser.add_argument("--model", required=True, type=Path, help="trained-model folder (holds model.json)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (report, predictions, panels)")
    _pipeline_run_id_argument(parser)


def _evaluate(args: argparse.Namespace) -> int:
    from ctv2v.steps.evaluate import evaluate_step

    _print_json(evaluate_step(config_from_args(args), args.data, args.model, args.out,
                              args.pipeline_run_id).to_dict())
    return 0


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="*", type=Path, metavar="EVAL_DIR",
                        help="evaluation output folders (the variant is read from each report.json)")
    parser.add_argument("--report", action="append", default=[], metavar="VARIANT=PATH",
                        help="an evaluation report.json or folder for VARIANT, e.g. pretrained=runs/p/evaluate")
    parser.add_argument("--out", required=True, type=Path, help="output folder (comparison.md, comparison.html)")
    _pipeline_run_id_argument(parser)
    add_config_arguments(parser, required=False)


def _report_paths(named: list[str], folders: list[Path]) -> dict[str, Path]:
    """`--report VARIANT=PATH` values and positional evaluation folders (variant read from each report)."""
    from ctv2v.evaluate.compare import ComparisonError, load_report

    paths: dict[str, Path] = {}

    def add(variant: str, path: Path) -> None:
        if variant in paths:
            raise ComparisonError(f"two reports for variant '{variant}': {paths[variant]} and {path}")
        paths[variant] = path

    for text in named:
        variant, sep, path = text.partition("=")
        if not sep or not variant or not path:
            raise ComparisonError(f"--report {text!r}: expected VARIANT=PATH, e.g. main=runs/main/evaluate")
        add(variant, Path(path))
    for folder in folders:
        add(load_report(folder).variant, Path(folder))
    return paths


def _compare(args: argparse.Namespace) -> int:
    from ctv2v.steps.compare import compare_step

    comparison = compare_step(_report_paths(args.report, args.folders), args.out, config_from_args(args).tracking,
                              args.pipeline_run_id)
    print(comparison.markdown)
    return 0


# ---------------------------------------------------------------------------------------------- pipeline
def _pipeline_config(args: argparse.Namespace) -> RunConfig:
    """The config of a `pipeline` command; run-local's --weights is a shorthand for vae.maisi.weights."""
    weights = getattr(args, "weights", None)
    return load_config(args.config or [], [*args.overrides, *([f"vae.maisi.weights={weights}"] if weights else [])])


def _images_lock_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images-lock", type=Path, default=None, metavar="FILE",
                        help="pin the step images to the digests in this lock file of "
                             "`scripts/build-images.sh --push` (e.g. build/images.lock.json)")


def _variant_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", "--branches", dest="branches", choices=BRANCHES, default="both",
                        help="which variant's branch the pipeline holds: main, pretrained, or both (default; "
                             "with the compare step)")


def _compile_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)
    parser.add_argument("-o", "--output", required=True, type=Path)
    _variant_argument(parser)
    _images_lock_argument(parser)


def _compile(args: argparse.Namespace) -> int:
    from pipeline.backend import required_backend_version
    from pipeline.compile import compile_pipeline

    config = _pipeline_config(args)
    print(compile_pipeline(config, args.output, images_lock=args.images_lock, variants=args.branches))
    print(f"compiled for KFP {config.cluster.kfp_backend} (cluster.kfp_backend); needs Kubeflow Pipelines >= "
          f"{required_backend_version(config.cluster)}", file=sys.stderr)
    return 0


def _submit_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--host", default=None,
                        help="KFP API endpoint, e.g. https://kubeflow.example/pipeline; default inside a cluster: "
                             "$KF_PIPELINES_ENDPOINT, else KFP's in-cluster address")
    parser.add_argument("--namespace", default=None, help="profile namespace (multi-user Kubeflow)")
    parser.add_argument("--experiment", default="ctv2v", help="KFP experiment name (default: ctv2v)")
    _variant_argument(parser)
    parser.add_argument("--run-name", default=None)
    # Never a token itself as an argument: other users see arguments in `ps`, shells keep them in history.
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                      help="bearer token in this file, read again before every request (default inside a cluster: "
                           "$KF_PIPELINES_SA_TOKEN_PATH)")
    auth.add_argument("--token-env", default=None, metavar="NAME",
                      help="bearer token in this environment variable, e.g. KFP_TOKEN")
    auth.add_argument("--cookie-env", default=None, metavar="NAME",
                      help="old Kubeflow installs (oidc-authservice, <= 1.8): a session cookie "
                           "'authservice_session=...' in this environment variable")
    parser.add_argument("--wait", action="store_true", help="follow the run; exit non-zero unless it succeeds")
    _images_lock_argument(parser)


def _submit(args: argparse.Namespace) -> int:
    from pipeline.submit import resolve_connection, submit

    config = _pipeline_config(args)
    connection = resolve_connection(args.host, args.token_file, args.token_env, args.cookie_env)
    print(submit(config, connection=connection, namespace=args.namespace, experiment=args.experiment,
                 variants=args.branches, run_name=args.run_name, wait=args.wait, images_lock=args.images_lock))
    return 0


def _run_local_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    _variant_argument(parser)
    parser.add_argument("--weights", choices=("pretrained", "stand-in"), default=None,
                        help="MAISI weights for the pretrained branch; `stand-in` builds random weights in "
                             "MAISI's layout (offline demos), labelled so everywhere")
    parser.add_argument("--out", type=Path, default=None, help="default: <data.workspace>/pipeline")


def _run_local(args: argparse.Namespace) -> int:
    from pipeline.local import run_local

    config = _pipeline_config(args)
    result = run_local(config, args.branches, args.out or config.data.workspace / "pipeline")
    if "compare_markdown" in result:
        print(Path(result["compare_markdown"]).read_text())
    _print_json(result)
    return 0


def _rerun_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="the run's workspace folder, <workspace_root>/runs/<pipeline run id>")
    parser.add_argument("--task", required=True, help="the task to rerun, e.g. train-frozen-main, evaluate-pretrained")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow server as this host reaches it (default: the run's config, else "
                             "MLFLOW_TRACKING_URI); a loopback address is rewritten for the container")
    parser.add_argument("--gpus", default=None, metavar="SPEC",
                        help="docker's --gpus value, e.g. all (needs the NVIDIA container runtime); default: CPU")


def _rerun(args: argparse.Namespace) -> int:
    from pipeline.rerun import rerun_command

    command = rerun_command(args.run_dir, args.task, tracking_uri_override=args.tracking_uri, gpus=args.gpus)
    for note in command.notes:
        print(f"# {note}", file=sys.stderr)
    print(command.line())
    return 0


# ------------------------------------------------------------------------------------ configs, data, models
def _config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(to_yaml(config_from_args(args)))
    return 0


def _fetch_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the demo folder goes (default $CTV2V_CACHE/demo or ~/.cache/ctv2v/demo)")


def _fetch_demo(args: argparse.Namespace) -> int:
    from ctv2v.data.demo import fetch_demo

    print(fetch_demo(args.cache_dir))
    return 0


def _fetch_unseen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the unseen CT's folder goes (default $CTV2V_CACHE/unseen or ~/.cache/ctv2v/unseen)")


def _fetch_unseen(args: argparse.Namespace) -> int:
    from ctv2v.data.demo import fetch_unseen_ct

    print(fetch_unseen_ct(args.cache_dir))
    return 0


def _baselines_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--factors", type=int, nargs="+", default=[2, 4], metavar="K",
                        help="thick factors to simulate (default: 2 4); the thick method is data.thick.method")
    parser.add_argument("--volumes", nargs="+", default=None, metavar="ID",
                        help="only these volume ids of the dataset (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <data.workspace>/baselines)")


def _baselines(args: argparse.Namespace) -> int:
    from ctv2v.config_io import write_resolved
    from ctv2v.data.cache import PreprocessCache
    from ctv2v.data.prepared import PREPROCESS_CACHE_DIR, stage_dataset
    from ctv2v.evaluate.baseline_report import baseline_report, format_table, write_report

    config = config_from_args(args)
    out = args.out if args.out is not None else config.data.workspace / "baselines"
    data_dir = config.data.workspace / BASELINES_DATA_DIR
    report = baseline_report(
        stage_dataset(config.data.source, data_dir, config), config.data, factors=args.factors,
        hu_min=config.evaluation.hu_min, hu_max=config.evaluation.hu_max, methods=config.evaluation.baselines,
        volume_ids=args.volumes, cache=PreprocessCache(data_dir / PREPROCESS_CACHE_DIR),
    )
    write_report(report, out)
    write_resolved(config, out)
    print(format_table(report))
    print(f"reports: {out}")
    return 0


def _model_summary_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _model_summary(args: argparse.Namespace) -> int:
    from ctv2v.train.estimate import format_summary, summarize

    summary = summarize(config_from_args(args))
    sys.stdout.write((json.dumps(summary, indent=2) if args.json else format_summary(summary)) + "\n")
    return 0


def _model_fit_arguments(parser: argparse.ArgumentParser) -> None:
    from ctv2v.train.estimate import CARDS, DEFAULT_SHARE

    add_config_arguments(parser)
    parser.add_argument("--card", required=True, choices=tuple(CARDS), help="the GPU to fill")
    parser.add_argument("--share", type=float, default=DEFAULT_SHARE,
                        help="keep the estimated peak under this share of the card (default %(default)s)")
    parser.add_argument("--write", type=Path, default=None, metavar="FILE",
                        help="write the preset overlay there (e.g. configs/v100-32gb.yaml); default: print it")


def _model_fit(args: argparse.Namespace) -> int:
    from ctv2v.files import atomic_write_text
    from ctv2v.train.estimate import fit, format_fit_table, preset_text

    card_fit = fit(config_from_args(args), args.card, args.share, progress=logging.getLogger("ctv2v.fit").info)
    command = " ".join(["ctv2v model fit", *(f"--config {path}" for path in args.config),
                        *(f"--set {override}" for override in args.overrides), f"--card {args.card}",
                        f"--share {args.share:g}", *([f"--write {args.write}"] if args.write else [])])
    text = preset_text(card_fit, command)
    print(format_fit_table([card_fit]))
    if args.write is None:
        print(text, end="")
    else:
        atomic_write_text(args.write, text)
        print(f"wrote {args.write}")
    return 0


def _mirror_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)
    parser.add_argument("file", type=Path, help="local checkpoint file")
    parser.add_argument("s3_uri", metavar="S3_URI", help="destination, s3://BUCKET/KEY")


def _mirror(args: argparse.Namespace) -> int:
    from ctv2v.remote.fetch import mirror

    digest = mirror(args.file, args.s3_uri, storage=config_from_args(args).storage)
    print(f"uploaded {args.file} -> {args.s3_uri} ({args.file.stat().st_size} bytes)")
    print(f"sha256: {digest}")
    print("put in the config:")
    print(f"  vae:\n    maisi:\n      checkpoint: {args.s3_uri}\n      sha256: {digest}")
    return 0


# ------------------------------------------------------------------------------------ tracking, predict
def _tracking_sync_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, required=False)
    parser.add_argument("folders", nargs="+", type=Path, metavar="DIR",
                        help="folders searched recursively for pending MLflow journals (mlflow-pending-*.json)")
    parser.add_argument("--ended", action="store_true",
                        help="the steps are over: also upload journals their step never closed (killed steps), "
                             "ending those runs FAILED")
    parser.add_argument("--tracking-uri", default=None,
                        help="upload to this server (e.g. a port-forward of the cluster's); default: "
                             "tracking.tracking_uri, else MLFLOW_TRACKING_URI, else the address each journal names")


def _sync_server(args: argparse.Namespace, config: RunConfig) -> tuple[str | None, str]:
    """The server `tracking sync` uploads to and where that choice came from (None: each journal's own address)."""
    import os

    for uri, source in ((args.tracking_uri, "--tracking-uri"), (config.tracking.tracking_uri, "tracking.tracking_uri"),
                        (os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI")):
        if uri:
            return uri, f"from {source}"
    return None, "the journal's address"


def _tracking_sync(args: argparse.Namespace) -> int:
    from ctv2v.tracking.pending import TrackingSyncError, upload_pending

    config = config_from_args(args)
    server, chosen_by = _sync_server(args, config)
    uploads = upload_pending(args.folders, config.tracking, steps_ended=args.ended, server=server)
    if not uploads:
        print(f"nothing pending under {', '.join(str(folder) for folder in args.folders)}")
    for upload in uploads:
        if upload.skipped:
            print(f"skipped {upload.journal}: {upload.skipped}")
            continue
        where = f"{upload.server} ({chosen_by})"
        sent = ", ".join(f"{count} {kind}" for kind, count in upload.sent.items() if count)
        if upload.complete:
            print(f"uploaded {upload.journal} to {where}: step {upload.step_name}, run {upload.run_id}: "
                  f"{sent or 'run state only'}; done")
        elif sent:
            print(f"uploaded part of {upload.journal} to {where}: step {upload.step_name}, run {upload.run_id}: "
                  f"{sent}; the rest is kept (server unreachable)")
        else:
            print(f"nothing uploaded from {upload.journal}: {where} unreachable; kept")
    left = [upload for upload in uploads if not (upload.complete or upload.skipped)]
    if left:
        raise TrackingSyncError(f"{len(left)} of {len(uploads)} pending journal(s) not fully uploaded (server "
                                f"{left[0].server} unreachable); they are kept for the next `ctv2v tracking sync`")
    return 0


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR|models:/NAME@ALIAS",
                        help="a trained-model folder (holds model.json), or a registered model URI")
    parser.add_argument("--input", required=True, type=Path, help="the thick series: a NIfTI file or DICOM folder")
    parser.add_argument("--out", required=True, type=Path, help="the thin series as a .nii.gz file")
    parser.add_argument("--out-dicom", type=Path, default=None, metavar="DIR",
                        help="also write the thin series as a new DICOM CT series into this new folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file and an --out-dicom series ctv2v wrote (never the input)")
    parser.add_argument("--factor", type=int, default=None,
                        help="thin slices per thick slice (default and only accepted value: the model's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow server for models:/ URIs (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--adapt", type=float, default=0.0, metavar="SECONDS",
                        help="first fine-tune the denoiser on the scan's own in-plane axes for at most SECONDS "
                             "(test-time adaptation; default 0: the model as trained)")


def _predict(args: argparse.Namespace) -> int:
    import tempfile

    from ctv2v.evaluate.predict import Predictor, check_outputs, predict_file

    check_outputs(args.input, args.out, args.out_dicom, args.overwrite)  # before the model is fetched or loaded
    if args.model.startswith("models:/"):
        from ctv2v.tracking.pyfunc import download_trained_model

        # The model is loaded into memory; its downloaded files are not kept.
        with tempfile.TemporaryDirectory(prefix="ctv2v-model-") as tmp:
            predictor = Predictor(download_trained_model(args.model, args.tracking_uri, Path(tmp)), args.device,
                                  args.adapt)
    else:
        predictor = Predictor(Path(args.model), args.device, args.adapt)
    _print_json(predict_file(predictor, args.input, args.out, args.out_dicom, args.factor, args.overwrite))
    return 0


# ------------------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, what adds its arguments, what runs it (returns the exit code)."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


GROUPS = {
    "pipeline": "compile, submit or run the KFP DAG",
    "config": "inspect configs",
    "data": "demo data and preprocessing",
    "model": "inspect the configured model",
    "checkpoint": "checkpoint utilities",
    "tracking": "MLflow tracking utilities",
}
"""Subcommands with subcommands of their own, e.g. `ctv2v pipeline submit`."""

COMMANDS = {
    "prepare-data": Command("stage data.source, write manifest.json, fill the cache",
                            _prepare_data_arguments, _prepare_data),
    "fetch-checkpoint": Command("fetch + verify MAISI's VAE checkpoint (or build a stand-in)",
                                _fetch_checkpoint_arguments, _fetch_checkpoint),
    "match": Command("load MAISI's VAE checkpoint 100%% strictly; write the VAE artifact", _match_arguments, _match),
    "train-vae": Command("train the scratch VAE (variant main); OUT becomes a VAE artifact",
                         _train_vae_arguments, _train_vae),
    "train": Command("train the diffusion model: --phase frozen (VAE frozen) or full", _train_arguments, _train),
    "evaluate": Command("score the trained model and the baselines on the test split",
                        _evaluate_arguments, _evaluate),
    "compare": Command("compare evaluation reports (main vs pretrained) as Markdown/HTML",
                       _compare_arguments, _compare),
    "pipeline compile": Command("compile the DAG to KFP YAML, validated against KFP's protobufs",
                                _compile_arguments, _compile),
    "pipeline submit": Command("compile and submit one run through kfp.Client", _submit_arguments, _submit),
    "pipeline run-local": Command("run the DAG on this machine under kfp.local (CPU)",
                                  _run_local_arguments, _run_local),
    "pipeline rerun": Command("print the `docker run` command that reruns one task of a finished run",
                              _rerun_arguments, _rerun),
    "predict": Command("turn a thick CT series (NIfTI or DICOM folder) into thin slices with a trained model",
                       _predict_arguments, _predict),
    "tracking sync": Command("upload pending MLflow journals found under folders (idempotent)",
                             _tracking_sync_arguments, _tracking_sync),
    "config show": Command("print the resolved config (fails on an unknown key)", add_config_arguments,
                           _config_show),
    "data fetch-demo": Command("download + verify the demo CT volumes; print the dataset folder",
                               _fetch_demo_arguments, _fetch_demo),
    "data fetch-unseen": Command("download + verify a head CT outside the demo and its split (a body region "
                                 "nobody tuned on); print its path", _fetch_unseen_arguments, _fetch_unseen),
    "data baselines": Command("score nearest/linear/cubic interpolation on the dataset; print the table, write JSON",
                              _baselines_arguments, _baselines),
    "model summary": Command("parameter counts, latent shapes and FLOPs per training step",
                             _model_summary_arguments, _model_summary),
    "model fit": Command("largest micro-batch per variant and phase that fills a V100 (estimated peak memory); "
                         "writes the card preset", _model_fit_arguments, _model_fit),
    "checkpoint mirror": Command("upload a local checkpoint to the cluster's object store; print its sha256 for "
                                 "the config", _mirror_arguments, _mirror),
}
"""Every subcommand, by its words on the command line."""


def build_parser() -> argparse.ArgumentParser:
    """The `ctv2v` argument parser, built from COMMANDS."""
    parser = argparse.ArgumentParser(prog="ctv2v", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks for errors")
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, command in COMMANDS.items():
        group, _, name = words.rpartition(" ")
        if group and group not in groups:
            groups[group] = top.add_parser(group, help=GROUPS[group]).add_subparsers(
                dest=f"{group}_command", required=True)
        sub = groups[group].add_parser(name, help=command.help) if group else top.add_parser(name, help=command.help)
        command.arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `ctv2v` command; returns its exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, OSError, RuntimeError, FloatingPointError) as exc:
        # Bad input (configs, files, tensors, servers, settings that make training diverge) gets one message;
        # --verbose shows the traceback.
        if args.verbose:
            raise
        print(f"ctv2v: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
