"""Orchestration overhead of the local pipeline: wall time vs the sum of the steps' own time, in one run.

Runs `ctv2v pipeline run-local --config configs/smoke.yaml --weights stand-in` (both branches, CPU) and reads
kfp.local's log: a step's own time runs from its executor's first log line (the component loaded, inputs
resolved) to "Wrote executor output file"; everything else in the pipeline's wall time (starting and ending
step processes, resolving the DAG, copying artifacts) is orchestration. Target (issue 19): under 8 % of the
steps' own time, the pipeline's wall being run_local's own clock, from the first task to the last. The whole command's wall time, which adds
the CLI's start-up (imports of torch, MONAI, kfp) and compiling the DAG, is printed beside it.

    .venv/bin/python benchmarks/bench_pipeline.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXECUTOR_LINE = re.compile(r"\[KFP Executor (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO\]: (.*)")
TASK_LINE = re.compile(r"Executing task \S*'([\w-]+)'")


def step_times(log: str) -> dict[str, float]:
    """Seconds from each task's first executor log line to its 'Wrote executor output file' line."""
    times: dict[str, float] = {}
    task, first = None, None
    for line in log.splitlines():
        if (match := TASK_LINE.search(line)) is not None:
            task, first = match.group(1), None
            continue
        if (match := EXECUTOR_LINE.search(line)) is None or task is None:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        first = stamp if first is None else first
        if match.group(2).startswith("Wrote executor output file"):
            times[task] = stamp - first
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="run folder to keep (default: a temporary one)")
    args = parser.parse_args()
    out = args.keep or Path(tempfile.mkdtemp(prefix="ctv2v-bench-pipeline-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "pipeline", "run-local", "--config",
                             "configs/smoke.yaml", "--weights", "stand-in", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
        return result.returncode
    times = step_times(result.stdout + result.stderr)
    pipeline_wall = json.loads(result.stdout[result.stdout.rindex("{\n"):])["wall_s"]
    print(f"local pipeline, configs/smoke.yaml, both branches, stand-in MAISI weights, load {os.getloadavg()[0]:.1f}")
    print(f"{'step':28s} {'own s':>8s}")
    for task, seconds in times.items():
        print(f"{task:28s} {seconds:8.1f}")
    own = sum(times.values())
    print(f"{'sum of steps':28s} {own:8.1f}")
    print(f"{'wall (pipeline)':28s} {pipeline_wall:8.1f}")
    print(f"{'wall (whole command)':28s} {wall:8.1f}")
    overhead = pipeline_wall - own
    print(f"orchestration overhead: {overhead:.1f} s = {100 * overhead / own:.1f} % of the steps' own time (target "
          f"< 8 %), {100 * overhead / pipeline_wall:.1f} % of the pipeline's wall; the whole command adds "
          f"{wall - pipeline_wall:.1f} s (CLI start-up, compiling the DAG)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
