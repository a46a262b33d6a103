"""Speed of `predict`: voxels per second and peak memory, the previous release's tiles beside the new ones, in one run.

First trains the smoke and cpu-quality models into --train (prepare-data, train-vae, train --phase frozen with
configs/main.yaml + the preset; cpu-quality one short epoch per step: speed does not depend on how well a model is
trained). Then for each model, volume and setting one child process runs
ctv2v.evaluate.predict.Predictor.predict on a thick series and reports its wall and CPU time, its tile plan, its
peak resident memory (ru_maxrss of the child, and the same before predict started: model and volume loaded) and the
network FLOPs of its tiles per CPU second (count_sample_flops: how near the run is to what the network itself costs):
- (a) `demo-3mm`: the demo abdomen example_ct (3 mm, 112 x 101 x 122), slab-averaged x4 (12 mm thick slices);
- (b) `demo-512`: the same CT linearly resampled in-plane to 0.75 mm pixels and padded with air to 512 x 512.
Settings, both from the same code, as config overrides (setting_overrides):
- `before`: the tiles of the previous release: data.clip's crop, data.clip.eval_overlap, the preset's
  tile_batch_size of then (BEFORE_BATCH), on the input's own pixels (data.resample.pixel_mm None: it never
  resampled in-plane); on demo-512 it runs on the first `--before-slices` thick slices only (whole volumes took up
  to an hour) and a block of `--before-crop` pixels square on the middle rows at the left edge (body and air:
  predict refuses a series without air), so its voxels/s is measured on that sub-volume (fixed tiles cost the
  same per voxel anywhere). Data consistency as the model's config says in
  both settings;
- `new`: every evaluation.tile_* setting `auto`, on the model's grid (data.resample.pixel_mm).
On demo-3mm (already the models' 3 mm grid, so only the tiles differ) PSNR (HU [-1000, 1000], synthesized slices)
against the thin truth is printed for both, with the PSNR at the slices next to z tile seams beside the rest, and
the voxelwise difference of the two outputs. Last, the `evaluate` step is timed on the demo test split with both
settings (and its per-volume PSNRs printed).

    nice -n 15 .venv/bin/python benchmarks/bench_predict.py --train /tmp/bench-predict
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOLUMES = ("demo-3mm", "demo-512")
FACTOR = 4
PRESETS = {
    "smoke": (["configs/main.yaml", "configs/smoke.yaml"], []),
    "cpu-quality": (["configs/main.yaml", "configs/cpu-quality.yaml"],
                    ["vae.scratch.epochs=1", "training.frozen.epochs=1", "data.clip.clips_per_volume=8"]),
}
"""The models --train builds: configs and overrides. Speed does not depend on how well a model is trained, so
cpu-quality trains one short epoch per step (its architecture and evaluation settings are the preset's)."""
LARGE_VOXELS = ((100 - 1) * FACTOR + 1) * 512 * 512
"""Output voxels of a 512 x 512 scan of 100 thick slices at x4 (thin slices over the covered range)."""
V100_FP16_FLOPS = 125e12
"""NVIDIA's V100 (SXM2) tensor-core peak for fp16."""
V100_UTILISATION = 0.3
"""The share of that peak assumed for cuDNN 3D convolutions with 16-256 channels (an assumption, not measured)."""
BEFORE_BATCH = {"smoke": 1, "cpu-quality": 8}
"""evaluation.tile_batch_size in the preset before the speed work (configs/smoke.yaml: the default 1)."""


def ctv2v(args: list[str], configs: list[str], overrides: list[str], log: Path) -> tuple[float, float]:
    """Run one `ctv2v` command with these configs and --set overrides (output to `log`); its (wall, CPU) seconds."""
    command = [sys.executable, "-m", "pipeline.cli", args[0], *[a for c in configs for a in ("--config", c)],
               *[a for o in overrides for a in ("--set", o)], *args[1:]]
    started, cpu_started = time.monotonic(), children_cpu_seconds()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed with exit code {result.returncode}; see {log}")
    return time.monotonic() - started, children_cpu_seconds() - cpu_started


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(name: str, out: Path) -> tuple[Path, Path]:
    """(model folder, data folder) of preset `name` trained into out/name (prepare-data, train-vae, frozen phase);
    a finished earlier run there is reused."""
    configs, overrides = PRESETS[name]
    folder = out / name
    data, vae, model = folder / "data", folder / "vae", folder / "frozen"
    if not (model / "model").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        for step in (["prepare-data", "--out", str(data)], ["train-vae", "--data", str(data), "--out", str(vae)],
                     ["train", "--phase", "frozen", "--data", str(data), "--vae", str(vae), "--out", str(model)]):
            seconds, _ = ctv2v(step, configs, overrides, folder / f"{step[0]}.log")
            print(f"trained {name}: {step[0]} {seconds:.0f} s", flush=True)
    return model / "model", data


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
    """One prediction in this process: print a JSON line with seconds, output voxels, peak memory and PSNRs."""
    import torch

    from ctv2v.data.clips import covering_tiles
    from ctv2v.data.interpolation import covered_slices
    from ctv2v.data.thick import ThickSeries
    from ctv2v.evaluate.evaluate import plan_tiles
    from ctv2v.evaluate.metrics import psnr, score_volume, synthesized_slices
    from ctv2v.evaluate.predict import Predictor
    from ctv2v.train.estimate import count_sample_flops

    thin, thick, spacing = make_volume(args.volume, args.demo)
    predictor = Predictor(args.child, "cpu")
    config = predictor.config
    overrides = setting_overrides(config.model_dump(mode="json"), args.setting, args.before_batch_child)
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(config, section) if section == "evaluation" else config.data.resample, name, value)
    if args.setting == "before" and args.volume == "demo-512":
        # Fixed tiles cost the same per voxel anywhere; a block at the edge holds air, which predict checks for.
        middle = thick.shape[1] // 2
        thick = thick[:args.before_slices, middle - args.before_crop // 2:middle + args.before_crop // 2,
                      :args.before_crop]
    series = ThickSeries(thick, FACTOR, spacing[0], spacing[0], "slab_average")
    covered = covered_slices(series)
    grid_rows, grid_cols = (thick.shape[1:] if config.data.resample.pixel_mm is None else
                            (round(n * s / config.data.resample.pixel_mm) for n, s in zip(thick.shape[1:], spacing[1:])))
    plan = plan_tiles(predictor.model, config, (covered, grid_rows, grid_cols), FACTOR, torch.device("cpu"),
                      thick.shape[0])
    torch.manual_seed(0)
    before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started, cpu_started = time.monotonic(), cpu_seconds()
    result = predictor.predict(thick, spacing)
    seconds = time.monotonic() - started
    spent = cpu_seconds() - cpu_started
    tiles = covering_tiles((covered, grid_rows, grid_cols), plan.size, plan.strides, FACTOR, thick.shape[0])
    line = {"seconds": seconds, "cpu_seconds": spent, "voxels": int(result.hu.size),
            "model_grid_mm": list(result.model_grid_mm), "tiles": plan.describe(),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_before_predict_mib": before_mib,
            "gflop_per_cpu_second": len(tiles) * count_sample_flops(config, plan.size) / spent / 1e9}
    if args.volume == "demo-3mm":
        truth = thin[:covered]
        line["psnr_db"] = score_volume(result.hu, truth, FACTOR, -1000, 1000)["synthesized"]["psnr_db"]
        # The thin slices on either side of where a tile starts in z (none with one tile along z).
        seams = {tile.z0 + d for tile in tiles if tile.z0 > 0 for d in (-1, 1)}
        synthesized = set(synthesized_slices(covered, FACTOR).tolist())
        at_seams = sorted(seams & synthesized)
        elsewhere = sorted(synthesized - seams)
        windowed_hu, windowed_truth = np.clip(result.hu, -1000, 1000), np.clip(truth, -1000, 1000)
        line["psnr_seams_db"] = psnr(windowed_hu[at_seams], windowed_truth[at_seams], 2000) if at_seams else None
        line["psnr_elsewhere_db"] = psnr(windowed_hu[elsewhere], windowed_truth[elsewhere], 2000)
        np.save(args.save, result.hu)
    print(json.dumps(line))
    return 0


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def setting_overrides(config: dict, setting: str, before_batch: int) -> dict:
    """The config keys (section.key) a setting changes: `before` the previous release's tiles on the input's own
    pixels, `new` every evaluation.tile_* auto."""
    if setting == "new":
        return {f"evaluation.{key}": "auto" for key in ("tile_frames", "tile_height", "tile_width", "tile_overlap",
                                                         "tile_batch_size")}
    clip = config["data"]["clip"]
    return {"evaluation.tile_frames": clip["frames"], "evaluation.tile_height": clip["height"],
            "evaluation.tile_width": clip["width"], "evaluation.tile_overlap": clip["eval_overlap"],
            "evaluation.tile_batch_size": before_batch, "resample.pixel_mm": None}


def run_child(model: Path, volume: str, setting: str, args: argparse.Namespace, before_batch: int,
              save: Path) -> dict:
    """Run one prediction in a child process (the output of demo-3mm saved to `save`); its JSON line."""
    command = [sys.executable, __file__, "--child", str(model), "--volume", volume, "--setting", setting,
               "--demo", str(args.demo), "--before-slices", str(args.before_slices),
               "--before-crop", str(args.before_crop),
               "--before-batch-child", str(before_batch), "--save", str(save)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_evaluate(model: Path, data: Path, setting: str, before_batch: int, out: Path
                  ) -> tuple[tuple[float, float], dict]:
    """((wall, CPU) seconds, {volume id: the model's PSNR dB on synthesized slices}) of `ctv2v evaluate` on a prepared
    data folder with the model's own config and the setting's overrides."""
    from ctv2v.models.artifacts import read_model_meta

    out.mkdir(parents=True, exist_ok=True)
    config = read_model_meta(model)["config"]
    config_file = out / "config.json"
    config_file.write_text(json.dumps(config))
    # The prepared data are on the model's grid already: only the tiles differ.
    overrides = [f"{key}={value}" for key, value in setting_overrides(config, setting, before_batch).items()
                 if key.startswith("evaluation.")]
    seconds = ctv2v(["evaluate", "--data", str(data), "--model", str(model), "--out", str(out / "evaluate")],
                    [str(config_file)], overrides, out / "evaluate.log")
    report = json.loads((out / "evaluate" / "report.json").read_text())
    return seconds, {volume["id"]: volume["metrics"]["model"]["synthesized"]["psnr_db"]
                     for volume in report["volumes"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path,
                        help="folder for the smoke and cpu-quality models (a finished earlier run there is reused)")
    parser.add_argument("--model", choices=tuple(PRESETS), action="append", default=None)
    parser.add_argument("--volume", choices=VOLUMES, action="append", default=None)
    parser.add_argument("--demo", type=Path, default=Path.home() / ".cache" / "ctv2v" / "demo")
    parser.add_argument("--before-slices", type=int, default=8,
                        help="thick slices the `before` setting runs on in demo-512")
    parser.add_argument("--before-crop", type=int, default=128,
                        help="in-plane size of the block the `before` setting runs on in demo-512")
    parser.add_argument("--no-evaluate", action="store_true", help="skip timing the evaluate step")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=("before", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--before-batch-child", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        args.volume = args.volume[0]
        return child(args)
    if args.train is None:
        parser.error("--train FOLDER is required")
    trained = {name: train(name, args.train) for name in args.model or PRESETS}
    print(f"predict on CPU, {os.cpu_count()} cores, torch threads {torch_threads()}, load "
          f"{os.getloadavg()[0]:.1f} at start; `before` on demo-512: the first {args.before_slices} thick slices, "
          f"{args.before_crop} x {args.before_crop} pixels of the middle rows at the left edge",
          flush=True)
    print("| model | volume | setting | tiles | model grid mm | output voxels | wall s | CPU s | voxels/s (wall) | "
          "voxels/CPU-s | network GFLOP/CPU-s | peak MiB (before predict) | PSNR dB (seams / elsewhere) |\n"
          "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
    outputs, large_rates = {}, {}
    for name, (model, _) in trained.items():
        for volume in args.volume or VOLUMES:
            rates, cpu_rates = {}, {}
            for setting in ("before", "new"):
                save = args.train / name / f"{volume}-{setting}.npy"
                line = run_child(model, volume, setting, args, BEFORE_BATCH[name], save)
                rates[setting] = line["voxels"] / line["seconds"]
                cpu_rates[setting] = line["voxels"] / line["cpu_seconds"]
                quality = (f"{line['psnr_db']:.3f} ({line['psnr_seams_db'] or float('nan'):.3f} / "
                           f"{line['psnr_elsewhere_db']:.3f})" if "psnr_db" in line else "-")
                print(f"| {name} | {volume} | {setting} | {line['tiles']} | "
                      f"{'x'.join(f'{v:g}' for v in line['model_grid_mm'])} | {line['voxels']} | "
                      f"{line['seconds']:.1f} | {line['cpu_seconds']:.1f} | {rates[setting]:.0f} | "
                      f"{cpu_rates[setting]:.0f} | {line['gflop_per_cpu_second']:.1f} | {line['peak_mib']:.0f} "
                      f"({line['peak_before_predict_mib']:.0f}) | {quality} |", flush=True)
                if "psnr_db" in line:
                    outputs[setting] = np.load(save)
            print(f"| {name} | {volume} | speed-up | | | | | | x{rates['new'] / rates['before']:.1f} | "
                  f"x{cpu_rates['new'] / cpu_rates['before']:.1f} | | | |", flush=True)
            if volume == "demo-512":
                large_rates[f"{name} (wall rate, this load)"] = rates["new"]
                large_rates[f"{name} (CPU rate x {os.cpu_count()} cores: both cores busy)"] = (
                    cpu_rates["new"] * os.cpu_count())
            if len(outputs) == 2:
                difference = np.abs(outputs["new"] - outputs["before"])
                print(f"{name} {volume}: |new - before| mean {difference.mean():.2f} HU, max {difference.max():.1f} HU",
                      flush=True)
            outputs = {}
    large_scan_estimates(large_rates)
    if not args.no_evaluate:
        for name, (model, data) in trained.items():
            results = {setting: time_evaluate(model, data, setting, BEFORE_BATCH[name],
                                              args.train / name / f"evaluate-{setting}")
                       for setting in ("before", "new")}
            print(f"evaluate step, {name}: " + "; ".join(
                f"{setting} {seconds[0]:.0f} s wall, {seconds[1]:.0f} CPU s, model PSNR " + ", ".join(f"{v} {db:.3f} dB" for v, db in psnrs.items())
                for setting, (seconds, psnrs) in results.items()), flush=True)
    print(f"load {os.getloadavg()[0]:.1f} at the end", flush=True)
    return 0


def large_scan_estimates(cpu_rates: dict[str, float]) -> None:
    """Print the time of a 512 x 512, 100-thick-slice x4 scan (0.75 mm pixels): cpu-quality from its measured
    demo-512 rates, and the main preset on a V100 from FLOPs counted per tile (ctv2v.train.estimate)."""
    from ctv2v.config_io import load_config
    from ctv2v.data.clips import covering_tiles
    from ctv2v.train.estimate import count_sample_flops

    n_thick, pixel_mm = 100, 0.75
    for name, rate in cpu_rates.items():
        print(f"512 x 512 x {n_thick} thick slices x{FACTOR}, {name}: {LARGE_VOXELS / rate:.0f} s at its demo-512 rate "
              f"{rate:.0f} voxels/s", flush=True)
    config = load_config([REPO / "configs" / "main.yaml"])
    factor, frames = config.data.thick.factor, config.data.clip.frames
    side = round(512 * pixel_mm / config.data.resample.pixel_mm)
    # The reformat CNN has no attention: auto tiles are whole slices of the model's grid where the card's memory
    # holds them (not measured here: no GPU), the training clip's frames long.
    tiles = covering_tiles((n_thick * factor, side, side), (frames, side, side), (frames - factor, side, side),
                           factor, n_thick)
    flops = len(tiles) * count_sample_flops(config, (frames, side, side))
    print(f"main preset (configs/main.yaml), same scan on its {config.data.resample.pixel_mm:g} mm grid: {len(tiles)} "
          f"tiles of {frames}x{side}x{side}, {config.evaluation_sample_steps} sampling steps, {flops / 1e12:.1f} "
          f"TFLOP (FlopCounterMode under FakeTensorMode); V100 at {V100_FP16_FLOPS / 1e12:.0f} TFLOP/s fp16 tensor "
          f"core peak and {V100_UTILISATION:.0%} of it: {flops / (V100_FP16_FLOPS * V100_UTILISATION):.1f} s of "
          "network time (resampling, interpolation and data consistency on the host not included)", flush=True)


def torch_threads() -> int:
    """torch's intra-op thread count in a fresh process (what the children use)."""
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
