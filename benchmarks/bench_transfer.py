"""What one training patient teaches without the VAE: the simplest learner on bench_quality's protocol (issue 18).

The denoiser's own ReformatCNN (ctv2v.models.denoiser) in image space: it reads the model's start (cubic+dc, the HU
window mapped to [0, 1]) and the k slab-phase channels, and predicts a residual. It is trained with MSE on clips of
the prepared data's training split, drawn as configs/cpu-quality.yaml draws them (data.augment: every slab phase,
every axis as the slice axis, flips). Then it is scored like the model on whole volumes: the input's full HU range
kept, data consistency, PSNR / SSIM-3D on synthesized slices over HU [-1000, 1000]. The volumes are the prepared
test split and, with --unseen, a CT of another body region, resampled and made thick as bench_quality does.

A volume where this learner gains and the latent model does not points at a defect of the latent model. A volume
where neither gains is one the training patient does not teach; there, test-time adaptation (evaluation.adapt)
is the product's answer.

    python benchmarks/bench_transfer.py --data /tmp/bench-quality/data --unseen ~/.cache/ctv2v/unseen/ct_head.nii.gz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "configs" / "main.yaml", REPO / "configs" / "cpu-quality.yaml"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a prepare-data folder made with cpu-quality.yaml")
    parser.add_argument("--unseen", type=Path, help="a CT of another body region to score on too")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=2, help="clips per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--score-every", type=int, default=100)
    args = parser.parse_args()

    from ctv2v.config_io import load_config
    from ctv2v.data.cache import Preprocessed
    from ctv2v.data.clips import TrainClips
    from ctv2v.data.interpolation import Interpolation, covered_slices
    from ctv2v.data.prepared import load_split_volumes
    from ctv2v.data.readers import read_volume
    from ctv2v.data.thick import project_to_thick, resample_spacing, simulate_thick
    from ctv2v.evaluate.evaluate import with_input_range
    from ctv2v.evaluate.metrics import score_volume
    from ctv2v.intensity import Intensity
    from ctv2v.models.denoiser import ReformatCNN, slab_phase_channels

    torch.set_flush_denormal(True)
    config = load_config(CONFIGS)
    factor, seed = config.data.thick.factor, config.seed
    torch.manual_seed(seed)
    intensity = Intensity.from_config(config.data.intensity)
    start_of = Interpolation(config.v2v.interpolation, config.v2v.consistent_interpolation)
    clip = config.data.clip.model_copy(update={"clips_per_volume": args.steps * args.batch})
    train = TrainClips(load_split_volumes(args.data, config, "train"), clip, intensity, seed, start_of,
                       config.data.augment, config.data.thick)
    net = ReformatCNN(1 + factor, 1, config.denoiser.reformat_width, config.denoiser.reformat_layers)
    volumes = load_split_volumes(args.data, config, "test")
    if args.unseen is not None:
        scan = read_volume(args.unseen)
        thin, spacing, affine = resample_spacing(scan.array, scan.spacing, scan.affine, config.data.resample)
        volumes.append(Preprocessed(f"unseen {args.unseen.name.split('.')[0]}", thin,
                                    simulate_thick(thin, spacing[0], config.data.thick), spacing, affine))

    def residual(start: torch.Tensor) -> torch.Tensor:
        """The net's residual for (B, 1, D, H, W) start clips whose first frame begins a thick slice."""
        b, _, d, h, w = start.shape
        phases = slab_phase_channels(d, factor, 1)[None, :, :, None, None].expand(b, factor, d, h, w)
        return net(torch.cat([start, phases], dim=1), torch.zeros(b, dtype=torch.long))

    def scores() -> str:
        net.eval()
        parts = []
        for volume in volumes:
            covered, start = covered_slices(volume.thick), start_of.of(volume)
            with torch.inference_mode():
                unit = torch.from_numpy(intensity.to_unit(start))[None, None]
                out = (unit + residual(unit)).clamp(0, 1)[0, 0].numpy()
            prediction = with_input_range(intensity.to_hu(out)[:covered], start[:covered], intensity)
            prediction = project_to_thick(prediction, volume.thick, volume.thin.shape[0])
            model, base = (score_volume(v, volume.thin[:covered], factor, -1000, 1000)["synthesized"]
                           for v in (prediction, start[:covered]))
            parts.append(f"{volume.volume_id} {model['psnr_db'] - base['psnr_db']:+.2f} dB / "
                         f"{model['ssim_3d'] - base['ssim_3d']:+.4f} (start {base['psnr_db']:.2f} / "
                         f"{base['ssim_3d']:.4f})")
        net.train()
        return "; ".join(parts)

    print(f"ReformatCNN width {config.denoiser.reformat_width}, {config.denoiser.reformat_layers} layers, in image "
          f"space on {config.v2v.interpolation}+dc; {args.steps} steps of {args.batch} clips "
          f"{clip.frames}x{clip.height}x{clip.width}, Adam lr {args.lr:g}, seed {seed}; augment "
          f"{config.data.augment.model_dump()}; gain over cubic+dc, PSNR / SSIM-3D", flush=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    started = time.monotonic()
    for step, batch in enumerate(DataLoader(train, batch_size=args.batch), start=1):
        loss = F.mse_loss(batch["interp"] + residual(batch["interp"]), batch["thin"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.score_every == 0 or step == args.steps:
            print(f"step {step} ({time.monotonic() - started:.0f} s, loss {loss.item():.5f}): {scores()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
