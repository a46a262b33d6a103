"""Step `prepare-data`: stage the dataset, write the split manifest, fill the preprocessing cache.

Both branches read the folder this step writes, so they are structurally bound to the same data and split.
In the pipeline the folder (cache included) lives on the workspace volume; the Dataset artifact carries the
manifest alone.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ctv2v.config import RunConfig
from ctv2v.data.prepared import prepare_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    """What prepare-data made: the folder, where the data came from, the volume ids of each split."""

    data_dir: Path
    source: str
    splits: dict[str, list[str]]
    thick_method: str
    thick_factor: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "data_dir": str(self.data_dir)}


def prepare_data_step(config: RunConfig, data_dir: Path) -> PreparedData:
    """Prepare `data_dir` from data.source."""
    data_dir = Path(data_dir)
    manifest = prepare_data(config, data_dir)
    prepared = PreparedData(data_dir=data_dir, source=config.data.source, splits=manifest["splits"],
                            thick_method=config.data.thick.method, thick_factor=config.data.thick.factor)
    log.info("prepared %s: %s", data_dir, prepared.splits)
    return prepared
