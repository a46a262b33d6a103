"""System metrics (`system/...`, the MLflow UI's system metrics tab) sampled on a thread of our own.

The samples come from MLflow's own CPU, disk, network and GPU monitors but are recorded through the Tracker's
metric buffer: MLflow's monitor thread stops for good at the first failed request, and needs a run id that does
not exist while the server is away at start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

log = logging.getLogger(__name__)


class SystemMetricsSampler:
    """A daemon thread sampling MLflow's system monitors every `interval_s` into a `record(metrics, step)`."""

    def __init__(self, interval_s: float, record: Callable[[Mapping[str, float], int], None]):
        self._interval_s = interval_s
        self._record = record
        self._monitors: list[BaseMetricsMonitor] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            self._monitors.append(GPUMonitor())
        except (ImportError, RuntimeError) as exc:
            log.info("no GPU system metrics: %s", exc)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctv2v-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = 0
        while not self._stop.wait(self._interval_s):
            values: dict[str, float] = {}
            for monitor in self._monitors:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            self._record({f"system/{key}": value for key, value in values.items()}, step)
            step += 1

    def stop(self) -> None:
        """Stop sampling and wait for the thread to end."""
        self._stop.set()
        self._thread.join()
