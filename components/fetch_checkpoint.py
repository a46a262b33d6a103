"""Pipeline step `fetch-checkpoint`: bring MAISI's VAE checkpoint into the run, verified, with provenance.

With vae.maisi.weights = "pretrained" the file named by vae.maisi.checkpoint is fetched (ctv2v.remote.fetch:
hf://, https://, s3://, file://) and checked against vae.maisi.sha256 / md5. With "stand-in" a checkpoint of
MAISI's exact CT layout with random values is built locally instead, for offline runs; its record says
`weights: stand-in` and every later output carries that label.

The pipeline and a local or docker rerun run the same command line, the resolved config that every step
output carries:
    ctv2v fetch-checkpoint --config resolved-config.yaml --out OUT
For an ad-hoc fetch, --source/--sha256/--md5 are shorthands for `--set vae.maisi.checkpoint=...` etc.:
    ctv2v fetch-checkpoint --source hf://MONAI/maisi_ct_generative/models/autoencoder.pt@main \
        --md5 917cfb1e49631c8a713e3bb7c758fbca --out OUT
`ctv2v checkpoint mirror FILE s3://BUCKET/KEY` copies a local checkpoint into the cluster's object store for
clusters that cannot reach the public source.
"""


import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kfp.dsl import Model, Output

from ctv2v.remote.fetch import (CheckpointFetchError, FetchRecord, SourceUnreachableError, fetch_checkpoint,
                               file_hashes, mirror, write_record)
from ctv2v.config import RunConfig
from ctv2v.config_io import write_resolved
from ctv2v.models.maisi import make_stand_in_checkpoint
from ctv2v.remote.storage import StorageError
from components.base import step_component

log = logging.getLogger(__name__)

STAND_IN_FILE = "autoencoder-stand-in.pt"
STAND_IN_HINT = ("for an offline run with random weights of MAISI's layout (a STAND-IN, not a pretrained "
                 "result) use --set vae.maisi.weights=stand-in")


def fetch_checkpoint_step(config: RunConfig, out_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Fetch (or, for stand-in weights, build) the MAISI VAE checkpoint into `out_dir`; returns its record."""
    maisi = config.vae.maisi
    out_dir = Path(out_dir)
    if maisi.weights == "stand-in":
        path = make_stand_in_checkpoint(out_dir / STAND_IN_FILE, seed=config.seed)
        sha256, md5 = file_hashes(path)
        record = FetchRecord(
            source=f"stand-in:random-maisi-ct-layout(seed={config.seed})", revision=None, file=path.name,
            size=path.stat().st_size, sha256=sha256, md5=md5,
            fetched_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), from_cache=False,
            weights="stand-in",
        )
        write_record(record, out_dir)
        log.warning("STAND-IN checkpoint: random weights with MAISI's CT layout (seed %d), NOT NVIDIA's pretrained "
                    "weights; every result from it is labelled stand-in", config.seed)
    else:
        try:
            record = fetch_checkpoint(maisi.checkpoint, out_dir, sha256=maisi.sha256, md5=maisi.md5,
                                      cache_dir=cache_dir, storage=config.storage)
        except SourceUnreachableError as exc:
            raise SourceUnreachableError(f"{exc}; {STAND_IN_HINT}") from exc
    write_resolved(config, out_dir)
    return {**record.to_dict(), "path": str(out_dir / record.file)}


# ---------------------------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    """Add the `fetch-checkpoint` and `checkpoint mirror` subcommands."""
    from ctv2v.config_io import add_config_arguments

    fetch = sub.add_parser("fetch-checkpoint", help="fetch + verify MAISI's VAE checkpoint (or build a stand-in)")
    add_config_arguments(fetch, required=False)
    fetch.add_argument("--source", metavar="URI",
                       help="shorthand for --set vae.maisi.checkpoint=URI (clears the config's hashes)")
    hashes = fetch.add_mutually_exclusive_group()
    hashes.add_argument("--sha256", metavar="HEX", help="shorthand for --set vae.maisi.sha256=HEX")
    hashes.add_argument("--md5", metavar="HEX", help="shorthand for --set vae.maisi.md5=HEX")
    fetch.add_argument("--cache-dir", type=Path, default=None,
                       help="checkpoint cache (default $CTV2V_CACHE/checkpoints or ~/.cache/ctv2v/checkpoints)")
    fetch.add_argument("--out", required=True, type=Path, help="output folder: the checkpoint + fetch-record.json")
    fetch.set_defaults(func=_fetch_command)

    checkpoint = sub.add_parser("checkpoint", help="checkpoint utilities").add_subparsers(
        dest="checkpoint_command", required=True)
    mirror_parser = checkpoint.add_parser(
        "mirror", help="upload a local checkpoint to the cluster's object store; print its sha256 for the config")
    add_config_arguments(mirror_parser, required=False)
    mirror_parser.add_argument("file", type=Path, help="local checkpoint file")
    mirror_parser.add_argument("s3_uri", metavar="S3_URI", help="destination, s3://BUCKET/KEY")
    mirror_parser.set_defaults(func=_mirror_command)


def _shorthand_overrides(args: argparse.Namespace) -> list[str]:
    """--source/--sha256/--md5 as the --set overrides they stand for (after the user's own --set)."""
    overrides = list(args.overrides)
    # JSON-quoted so YAML keeps them strings (an all-digit md5 would otherwise parse as a number).
    if args.source is not None:
        overrides += [f"vae.maisi.checkpoint={json.dumps(args.source)}", "vae.maisi.sha256=null", "vae.maisi.md5=null"]
    if args.sha256 is not None:
        overrides.append(f"vae.maisi.sha256={json.dumps(args.sha256)}")
    if args.md5 is not None:
        overrides.append(f"vae.maisi.md5={json.dumps(args.md5)}")
    return overrides


def _fetch_command(args: argparse.Namespace) -> int:
    from ctv2v.config_io import config_from_args

    args.overrides = _shorthand_overrides(args)
    config = config_from_args(args)
    try:
        record = fetch_checkpoint_step(config, args.out, cache_dir=args.cache_dir)
    except (CheckpointFetchError, StorageError, ValueError, OSError) as exc:
        print(f"ctv2v fetch-checkpoint: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(record, indent=2))
    return 0


def _mirror_command(args: argparse.Namespace) -> int:
    from ctv2v.config_io import config_from_args

    config = config_from_args(args)
    try:
        digest = mirror(args.file, args.s3_uri, storage=config.storage)
    except (StorageError, ValueError, OSError) as exc:
        print(f"ctv2v checkpoint mirror: {exc}", file=sys.stderr)
        return 1
    print(f"uploaded {args.file} -> {args.s3_uri} ({args.file.stat().st_size} bytes)")
    print(f"sha256: {digest}")
    print("put in the config:")
    print(f"  vae:\n    maisi:\n      checkpoint: {args.s3_uri}\n      sha256: {digest}")
    return 0


# ---------------------------------------------------------------------------------------------- KFP
@step_component
def fetch_checkpoint_op(config_yaml: str, checkpoint: Output[Model]):
    """Fetch MAISI's VAE checkpoint (or build a stand-in); `checkpoint` receives the file and fetch-record.json."""
    import logging
    from pathlib import Path

    from components.fetch_checkpoint import fetch_checkpoint_step
    from ctv2v.config_io import config_from_text

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record = fetch_checkpoint_step(config_from_text(config_yaml, "config_yaml"), Path(checkpoint.path))
    checkpoint.metadata.update({key: record[key] for key in ("source", "sha256", "size", "weights")})
