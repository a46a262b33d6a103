"""Speed of `predict`: voxels per second and peak memory, today's tiles beside the new ones, in one run.

For each trained-model folder given (e.g. the smoke and cpu-quality models, `model/` of a `train --phase full`
output) and each volume, one child process runs ctv2v.evaluate.predict.Predictor.predict on a thick series and
reports its wall time and its peak resident memory (ru_maxrss):
- (a) `demo-3mm`: the demo abdomen example_ct (3 mm, 112 x 101 x 122), slab-averaged x4 (12 mm thick slices);
- (b) `demo-512`: the same CT linearly resampled in-plane to 0.75 mm pixels and padded with air to 512 x 512.
Settings:
- `before`: the tiles of the previous release: data.clip's crop, data.clip.eval_overlap, the config's
  tile_batch_size of before (`--before-batch`), on the input's own pixels (it never resampled in-plane); on
  demo-512 it runs on the first `--before-slices` thick slices only (whole volumes took up to an hour), so its
  voxels/s is measured on that sub-volume. Data consistency as the model's config says in both settings (the
  previous predict applied none, its evaluate did), so the PSNRs compare the tiles alone;
- `new`: every evaluation.tile_* setting `auto`, on the model's grid (data.resample.pixel_mm).
PSNR (HU [-1000, 1000], synthesized slices) against the thin truth is printed for both where it exists (demo-3mm),
with the PSNR at the slices next to z tile seams beside the rest. `--evaluate DATA` also times the `evaluate` step
on a prepared data folder with both settings.

    nice -n 15 .venv/bin/python benchmarks/bench_predict.py --model smoke=DIR --model cpu-quality=DIR \\
        --before-batch smoke=1 --before-batch cpu-quality=8 [--evaluate cpu-quality=DATA_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOLUMES = ("demo-3mm", "demo-512")
FACTOR = 4


def make_volume(name: str, demo_dir: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(thin truth HU, thick HU, thick spacing) of a benchmark volume (slice, row, col)."""
    from ctv2v.config import ThickConfig
    from ctv2v.data.readers import read_volume
    from ctv2v.data.thick import simulate_thick
    from ctv2v.evaluate.predict import upsample_in_plane

    volume = read_volume(demo_dir / "example_ct.nii.gz")
    thin, spacing = volume.array.astype(np.float32), volume.spacing
    if name == "demo-512":
        pixel = 0.75
        shape = tuple(int(n * s / pixel) for n, s in zip(thin.shape[1:], spacing[1:]))
        fine = upsample_in_plane(thin, shape, spacing[1:], (pixel, pixel))
        thin = np.full((thin.shape[0], 512, 512), -1024.0, dtype=np.float32)
        thin[:, :shape[0], :shape[1]] = fine
        spacing = (spacing[0], pixel, pixel)
    thick = simulate_thick(thin, spacing[0], ThickConfig(method="slab_average", factor=FACTOR))
    return thin, thick.array, (thick.spacing_mm, spacing[1], spacing[2])


def child(args: argparse.Namespace) -> int:
    """One prediction in this process: print a JSON line with seconds, output voxels and PSNRs."""
    import torch

    from ctv2v.data.interpolation import covered_slices
    from ctv2v.data.thick import ThickSeries
    from ctv2v.evaluate.evaluate import plan_tiles
    from ctv2v.evaluate.metrics import psnr, score_volume, synthesized_slices
    from ctv2v.evaluate.predict import Predictor

    thin, thick, spacing = make_volume(args.volume, args.demo)
    predictor = Predictor(args.child, "cpu")
    settings = predictor.config.evaluation
    if args.setting == "before":
        clip = predictor.config.data.clip
        if args.volume == "demo-512":
            thick = thick[:args.before_slices]
        settings.tile_frames, settings.tile_height, settings.tile_width = clip.frames, clip.height, clip.width
        settings.tile_overlap, settings.tile_batch_size = clip.eval_overlap, args.before_batch_child
        predictor.config.data.resample.pixel_mm = None
    series = ThickSeries(thick, FACTOR, spacing[0], spacing[0], "slab_average")
    covered = covered_slices(series)
    torch.manual_seed(0)
    started = time.monotonic()
    result = predictor.predict(thick, spacing)
    seconds = time.monotonic() - started
    line = {"seconds": seconds, "voxels": int(result.hu.size), "model_grid_mm": list(result.model_grid_mm)}
    if args.volume == "demo-3mm":
        truth = thin[:covered]
        line["psnr_db"] = score_volume(result.hu, truth, FACTOR, -1000, 1000)["synthesized"]["psnr_db"]
        plan = plan_tiles(predictor.model, predictor.config, truth.shape, FACTOR, torch.device("cpu"))
        seams = {z0 + d for z0 in range(plan.strides[0], covered, plan.strides[0]) for d in (-1, 1)}
        synthesized = set(synthesized_slices(covered, FACTOR).tolist())
        at_seams = sorted(seams & synthesized)
        elsewhere = sorted(synthesized - seams)
        windowed_hu, windowed_truth = np.clip(result.hu, -1000, 1000), np.clip(truth, -1000, 1000)
        line["psnr_seams_db"] = psnr(windowed_hu[at_seams], windowed_truth[at_seams], 2000) if at_seams else None
        line["psnr_elsewhere_db"] = psnr(windowed_hu[elsewhere], windowed_truth[elsewhere], 2000)
    print(json.dumps(line))
    return 0


def run_child(model: Path, volume: str, setting: str, args: argparse.Namespace, before_batch: int) -> dict:
    """Run one prediction in a child process; its JSON line plus its peak resident memory (MiB)."""
    command = [sys.executable, __file__, "--child", str(model), "--volume", volume, "--setting", setting,
               "--demo", str(args.demo), "--before-slices", str(args.before_slices),
               "--before-batch-child", str(before_batch)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    line = json.loads(result.stdout.strip().splitlines()[-1])
    # ru_maxrss of children is the largest of any child so far: meaningful when it grew, else at most `before`.
    line["peak_mib"] = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
    line["peak_is_upper_bound"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss == before
    return line


def time_evaluate(name: str, model: Path, data: Path, setting: str, before_batch: int) -> float:
    """Wall seconds of `ctv2v evaluate` on a prepared data folder with the model's own config."""
    from ctv2v.models.artifacts import read_model_meta

    config_file = Path(tempfile.mkdtemp(prefix="bench-predict-")) / "config.json"
    config_file.write_text(json.dumps(read_model_meta(model)["config"]))
    overrides = []
    if setting == "before":
        config = read_model_meta(model)["config"]
        clip = config["data"]["clip"]
        overrides = [f"evaluation.tile_frames={clip['frames']}", f"evaluation.tile_height={clip['height']}",
                     f"evaluation.tile_width={clip['width']}", f"evaluation.tile_overlap={clip['eval_overlap']}",
                     f"evaluation.tile_batch_size={before_batch}"]
    command = [sys.executable, "-m", "pipeline.cli", "evaluate", "--config", str(config_file),
               *[arg for o in overrides for arg in ("--set", o)], "--data", str(data), "--model", str(model),
               "--out", str(config_file.parent / "evaluate")]
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=DIR of a trained-model folder")
    parser.add_argument("--before-batch", action="append", default=[],
                        help="NAME=N: the model config's evaluation.tile_batch_size of before (default 1)")
    parser.add_argument("--evaluate", action="append", default=[], help="NAME=DATA: time `evaluate` on it")
    parser.add_argument("--volume", choices=VOLUMES, action="append", default=None)
    parser.add_argument("--demo", type=Path, default=Path.home() / ".cache" / "ctv2v" / "demo")
    parser.add_argument("--before-slices", type=int, default=8, help="thick slices the `before` setting runs on")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=("before", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--before-batch-child", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        args.volume = args.volume[0]
        return child(args)
    models = dict(item.split("=", 1) for item in args.model)
    batches = {name: int(n) for name, n in (item.split("=", 1) for item in args.before_batch)}
    print(f"predict on CPU, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start; "
          f"`before` on the first {args.before_slices} thick slices", flush=True)
    print("| model | volume | setting | model grid mm | output voxels | s | voxels/s | peak MiB | PSNR dB "
          "(seams / elsewhere) |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |", flush=True)
    for name, model in models.items():
        for volume in args.volume or VOLUMES:
            rates = {}
            for setting in ("before", "new"):
                line = run_child(Path(model), volume, setting, args, batches.get(name, 1))
                rates[setting] = line["voxels"] / line["seconds"]
                quality = (f"{line['psnr_db']:.3f} ({line['psnr_seams_db'] or float('nan'):.3f} / "
                           f"{line['psnr_elsewhere_db']:.3f})" if "psnr_db" in line else "-")
                peak = f"{'<=' if line['peak_is_upper_bound'] else ''}{line['peak_mib']:.0f}"
                print(f"| {name} | {volume} | {setting} | {'x'.join(f'{v:g}' for v in line['model_grid_mm'])} | "
                      f"{line['voxels']} | {line['seconds']:.1f} | {rates[setting]:.0f} | {peak} | {quality} |",
                      flush=True)
            print(f"| {name} | {volume} | speed-up | | | | x{rates['new'] / rates['before']:.1f} | | |", flush=True)
    for item in args.evaluate:
        name, data = item.split("=", 1)
        walls = {setting: time_evaluate(name, Path(models[name]), Path(data), setting, batches.get(name, 1))
                 for setting in ("before", "new")}
        print(f"evaluate step, {name}: before {walls['before']:.0f} s, new {walls['new']:.0f} s", flush=True)
    print(f"load {os.getloadavg()[0]:.1f} at the end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
