"""Step `fetch-checkpoint`: bring MAISI's VAE checkpoint into the run, verified, with provenance.

With vae.maisi.weights = "pretrained" the file named by vae.maisi.checkpoint is fetched (ctv2v.remote.fetch:
hf://, https://, s3://, file://) and checked against vae.maisi.sha256 / md5. With "stand-in" a checkpoint of
MAISI's exact CT layout with random values is built locally instead, for offline runs; its record says
`weights: stand-in` and every later output carries that label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ctv2v.config import RunConfig
from ctv2v.config_io import write_resolved
from ctv2v.models.maisi import make_stand_in_checkpoint
from ctv2v.remote.fetch import FetchRecord, SourceUnreachableError, fetch_checkpoint, file_hashes, write_record

log = logging.getLogger(__name__)

STAND_IN_FILE = "autoencoder-stand-in.pt"
STAND_IN_HINT = ("for an offline run with random weights of MAISI's layout (a STAND-IN, not a pretrained "
                 "result) use --set vae.maisi.weights=stand-in")


@dataclass(frozen=True)
class FetchedCheckpoint:
    """The fetch record of the checkpoint and where the file is."""

    record: FetchRecord
    path: Path

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the record's fields and the file's path."""
        return {**self.record.to_dict(), "path": str(self.path)}


def fetch_checkpoint_step(config: RunConfig, out_dir: Path, cache_dir: Path | None = None) -> FetchedCheckpoint:
    """Fetch (or, for stand-in weights, build) the MAISI VAE checkpoint into `out_dir`."""
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
    return FetchedCheckpoint(record=record, path=out_dir / record.file)
