"""Reading + preprocessing the demo volumes: cold (decode NIfTI/DICOM, simulate thick) vs from the cache.

Usage: python benchmarks/bench_preprocess.py [--rounds N] [--factor K] [--method slab_average|subsample]

Each round makes a new empty cache, loads every demo volume once (cold: content hash check, decode, thick
simulation, atomic .npz write) and then again (warm: .npz hash check and load). Reported: thin slices per
second for both and their ratio (target >= 10x), median over rounds. The DICOM decoder is warmed up on one
file first so that a one-time plugin import does not count against the cold path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from ctv2v.config import DataConfig, ThickConfig
from ctv2v.data.cache import PreprocessCache
from ctv2v.data.demo import fetch_demo
from ctv2v.data.manifest import build_manifest
from ctv2v.data.readers import dicom_series_files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--method", choices=["slab_average", "subsample"], default="slab_average")
    args = parser.parse_args()

    demo = fetch_demo()
    data = DataConfig(thick=ThickConfig(method=args.method, factor=args.factor))
    manifest = build_manifest(demo, data.split, data.thick, data.slice_spacing_tolerance)
    pydicom.dcmread(dicom_series_files(demo / "example_ct_dicom")[0]).pixel_array  # decoder warm-up

    volumes = manifest["volumes"]
    cold = {v["id"]: [] for v in volumes}
    warm = {v["id"]: [] for v in volumes}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as root:
            cache = PreprocessCache(Path(root))
            for timings in (cold, warm):
                for entry in volumes:
                    start = time.perf_counter()
                    cache.load(demo, entry, data)
                    timings[entry["id"]].append(time.perf_counter() - start)

    slices = {v["id"]: v["shape"][0] for v in volumes}
    print(f"demo volumes, thick: {args.method} x{args.factor}, {args.rounds} rounds (median of each)")
    print(f"{'volume':<26} {'shape':<16} {'cold s':>8} {'cache s':>8} {'ratio':>7}")
    for entry in volumes:
        c, w = statistics.median(cold[entry["id"]]), statistics.median(warm[entry["id"]])
        print(f"{entry['id']:<26} {'x'.join(map(str, entry['shape'])):<16} {c:8.3f} {w:8.3f} {c / w:6.1f}x")
    total_slices = sum(slices.values())
    cold_total = statistics.median(sum(t[i] for t in cold.values()) for i in range(args.rounds))
    warm_total = statistics.median(sum(t[i] for t in warm.values()) for i in range(args.rounds))
    print(f"{'all 4 volumes':<26} {total_slices:>5} slices     {cold_total:8.3f} {warm_total:8.3f} "
          f"{cold_total / warm_total:6.1f}x")
    print(f"cold: {total_slices / cold_total:8.1f} slices/s   cache: {total_slices / warm_total:8.1f} slices/s   "
          f"ratio {cold_total / warm_total:.1f}x (target >= 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
