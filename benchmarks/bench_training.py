"""Training benchmarks at the smoke size on the demo CT data, side by side in one run (CPU):

- frozen phase, one epoch with the latent cache vs encoding every batch (target: cached >= 3x faster),
  plus the one-time cost of building the cache;
- full phase clips/s;
- peak RSS of each case (each runs in its own spawned process, so the peaks do not mix).

    .venv/bin/python benchmarks/bench_training.py [--variants main pretrained] [--epochs 2] [--clips-per-volume 8]
        [--crop 64 128 128]

Both variants use untrained VAE weights (the `pretrained` variant: a random-value VAE with MAISI's exact
layout, i.e. stand-in weights): speed does not depend on the values. The first epoch of each case includes
torch's warm-up, so epoch times are reported for the last epoch; the cache build is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctv2v.config import RunConfig
from ctv2v.config_io import load_config
from ctv2v.data.cache import Preprocessed  # noqa: E402
from ctv2v.data.clips import TrainClips  # noqa: E402
from ctv2v.data.prepared import load_split_volumes, prepare_data  # noqa: E402
from ctv2v.device import resolve_precision  # noqa: E402
from ctv2v.intensity import Intensity  # noqa: E402
from ctv2v.models.v2v import build_model  # noqa: E402
from ctv2v.data.latents import LatentClips, encode_training_volumes
from ctv2v.train.loop import TrainJob, runtime_from_env, train_loop
from ctv2v.train.objectives import DiffusionObjective
from ctv2v.models.vae import build_untrained_vae  # noqa: E402

CASES = ("frozen-cached", "frozen-per-batch", "full")
DEFAULT_CROP = (64, 128, 128)
"""Central crop of each training volume: MAISI's 64-128-256-channel encoder needs minutes per 10^6 voxels on
2 CPU cores, and the demo's training volume (191 x 167 x 233) would make its cache build take the better
part of an hour. The crop keeps the comparison about epoch speed; `--crop 0 0 0` uses whole volumes."""


def central_crop(volume: Preprocessed, size: tuple[int, int, int]) -> Preprocessed:
    """The central (slices, rows, cols) crop of a volume and its thick series (thick slice j stays on thin j*k)."""
    k = volume.thick.factor
    depth, rows, cols = (min(want, have) for want, have in zip(size, volume.thin.shape))
    z0 = (volume.thin.shape[0] - depth) // 2 // k * k
    y0, x0 = (volume.thin.shape[1] - rows) // 2, (volume.thin.shape[2] - cols) // 2
    thin = volume.thin[z0:z0 + depth, y0:y0 + rows, x0:x0 + cols]
    thick = volume.thick.array[z0 // k:(z0 + depth + k - 1) // k, y0:y0 + rows, x0:x0 + cols]
    return replace(volume, thin=np.ascontiguousarray(thin),
                   thick=replace(volume.thick, array=np.ascontiguousarray(thick)))


def bench_config(variant: str, epochs: int, clips_per_volume: int) -> RunConfig:
    """configs/<variant>.yaml + smoke.yaml, with `epochs` per phase and no checkpoints inside the timed epochs."""
    return load_config(
        [REPO / "configs" / f"{variant}.yaml", REPO / "configs" / "smoke.yaml"],
        [f"training.frozen.epochs={epochs}", f"training.full.epochs={epochs}",
         f"data.clip.clips_per_volume={clips_per_volume}", "training.checkpoint_every_steps=1000000"],
    )


def run_case(variant: str, case: str, data_dir: Path, work: Path, epochs: int, clips_per_volume: int,
             crop: tuple[int, int, int] | None, queue: mp.Queue) -> None:
    """One case in a fresh process: train `epochs` epochs, report per-epoch times, clips/s and peak RSS."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {variant} {case}: %(message)s")
    torch.manual_seed(0)
    config = bench_config(variant, epochs, clips_per_volume)
    cpu = runtime_from_env(config).device  # CPU here; also flushes subnormals, as the training steps do
    intensity = Intensity.from_config(config.data.intensity)
    vae = build_untrained_vae(config)
    vae.weights_label = "stand-in" if variant == "pretrained" else "scratch"
    model = build_model(config, vae)
    volumes = load_split_volumes(data_dir, config, "train")
    if crop is not None:
        volumes = [central_crop(volume, crop) for volume in volumes]
    cache_seconds = None
    if case == "frozen-cached":
        start = time.perf_counter()
        latents = encode_training_volumes(model.vae, volumes, config.data.clip, intensity, cpu)
        cache_seconds = time.perf_counter() - start
        train_set = LatentClips(latents, config.data.clip, model.vae.factors, config.data.thick.factor, config.seed)
    else:
        train_set = TrainClips(volumes, config.data.clip, intensity, config.seed)
    phase = "full" if case == "full" else "frozen"
    if phase == "full":
        model.unfreeze_vae()
    settings = config.training.full if phase == "full" else config.training.frozen
    epoch_times: list[float] = []
    job = TrainJob(
        name=phase, config=config, objective=DiffusionObjective(model),
        param_groups=model.param_groups(settings.lr, config.training.full.vae_lr_multiplier if phase == "full"
                                        else 0.0, config.training.weight_decay),
        train_set=train_set, epochs=epochs, batch_size=settings.batch_size, warmup_steps=0,
        states={"denoiser": model.denoiser, "vae": model.vae} if phase == "full" else {"denoiser": model.denoiser},
        out_dir=work / f"{variant}-{case}", device=cpu,
        precision=resolve_precision("auto", cpu),
        # An epoch's end is where validation would run: stamp the time there.
        validate=lambda _ema: epoch_times.append(time.perf_counter()) or {"val_loss": 0.0},
    )
    start = time.perf_counter()
    result = train_loop(job)
    stamps = [start, *epoch_times]
    queue.put({
        "variant": variant, "case": case, "clips_per_epoch": len(train_set),
        "train_volume_shapes": [list(volume.thin.shape) for volume in volumes],
        "epoch_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
        "cache_build_seconds": cache_seconds, "steps": result.global_step,
        "clips_per_second": result.clips_per_second,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_1min": os.getloadavg()[0],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["main", "pretrained"], choices=["main", "pretrained"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--clips-per-volume", type=int, default=8)
    parser.add_argument("--crop", type=int, nargs=3, default=list(DEFAULT_CROP), metavar=("D", "H", "W"),
                        help="central crop of the training volumes (0 0 0: whole volumes)")
    args = parser.parse_args()
    crop = tuple(args.crop) if any(args.crop) else None
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        prepare_data(bench_config("main", args.epochs, args.clips_per_volume), data_dir)
        rows = []
        for variant in args.variants:
            for case in CASES:
                queue = context.Queue()
                proc = context.Process(target=run_case, args=(variant, case, data_dir, work, args.epochs,
                                                              args.clips_per_volume, crop, queue))
                proc.start()
                row = queue.get()
                proc.join()
                if proc.exitcode != 0:
                    raise RuntimeError(f"{variant} {case} failed with exit code {proc.exitcode}")
                rows.append(row)
                print(json.dumps(row), flush=True)
    config = bench_config("main", args.epochs, args.clips_per_volume)
    print(f"\nsmoke size: clip {config.data.clip.frames}x{config.data.clip.height}x{config.data.clip.width}, "
          f"batch {config.training.frozen.batch_size}, {args.clips_per_volume} clips per train volume "
          f"{rows[0]['train_volume_shapes']}, "
          f"demo data, CPU {torch.get_num_threads()} threads, fp32; epoch time = last of {args.epochs} epochs; "
          f"1-min load average at the end of each case: {[round(row['load_average_1min'], 1) for row in rows]} "
          "(other processes on the machine slow every case)")
    print(f"{'variant':<11} {'case':<17} {'epoch s':>8} {'cache s':>8} {'clips/s':>8} {'peak RSS MiB':>13}")
    for row in rows:
        cache = f"{row['cache_build_seconds']:.2f}" if row["cache_build_seconds"] is not None else "-"
        print(f"{row['variant']:<11} {row['case']:<17} {row['epoch_seconds'][-1]:>8.2f} {cache:>8} "
              f"{row['clips_per_epoch'] / row['epoch_seconds'][-1]:>8.2f} {row['peak_rss_mib']:>13.0f}")
    for variant in args.variants:
        by_case = {row["case"]: row for row in rows if row["variant"] == variant}
        cached, per_batch = by_case["frozen-cached"], by_case["frozen-per-batch"]
        speedup = per_batch["epoch_seconds"][-1] / cached["epoch_seconds"][-1]
        saving = per_batch["epoch_seconds"][-1] - cached["epoch_seconds"][-1]
        payback = (f"pays for itself after {cached['cache_build_seconds'] / saving:.2f} epochs" if saving > 0
                   else "never pays for itself at this size")
        print(f"{variant}: latent cache epoch speed-up x{speedup:.1f} (target >= 3); the one-time cache build "
              f"({cached['cache_build_seconds']:.1f} s) {payback}")


if __name__ == "__main__":
    main()
