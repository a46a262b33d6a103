"""The quality benchmark (issue 18): the cpu-quality `main` branch against interpolation, with and without test-time
adaptation, with the ablations of each ingredient, the VAE ceiling and the residual-decoding oracle.

Runs the branch's steps with the command lines the pipeline runs (prepare-data, train-vae, train --phase frozen,
train --phase full, evaluate; configs/main.yaml + configs/cpu-quality.yaml), each timed, into --out. The evaluate
step runs with evaluation.adapt.seconds = --adapt, so its report holds the model and the model adapted to each
test scan (`model+adapt`) side by side. "adapt only" is an untrained denoiser (frozen phase of 0 epochs on the
same VAE) adapted to each scan: no thin slice of any patient teaches it the through-plane residual (its VAE was
trained as an autoencoder on the training patient). Then prints, per test volume (synthesized slices, PSNR dB /
SSIM-3D / MAE HU, and the gain over the model's start cubic+dc):
- the model's start (cubic+dc), the model, model+adapt, adapt only;
- nearest / linear / cubic and their +dc forms;
- the VAE ceiling decode(encode(thin)) and the residual-decoding oracle (what a perfect denoiser reaches);
- ablations at evaluation (no data consistency, no residual decoding, frozen phase only) and, with
  --ablate-training, one retrained frozen phase per ingredient switched off (scored against the frozen phase);
- the floors of issue 18, each PASS or FAIL;
- the val PSNR per epoch of both phases and the wall time of every step.
With --unseen PATH (a CT of another body region, e.g. from `ctv2v data fetch-unseen`), the trained model is also
scored on it, resampled and made thick exactly as the test volumes.

    python benchmarks/bench_quality.py --out /tmp/bench-quality        # ~30 min on 2 quiet cores
    python benchmarks/bench_quality.py --out /tmp/bench-quality --reuse  # re-score a finished run
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "configs" / "main.yaml", REPO / "configs" / "cpu-quality.yaml"]
OVERRIDES: list[str] = []
"""--set overrides given to the benchmark, passed to every step (and to the VAE rows' config)."""
VALIDATION_LINE = re.compile(r"(\w+) epoch (\d+) validation: (.*)")
START = "cubic+dc"
"""The model's start (v2v: cubic, consistent_interpolation) among the report's methods."""

EVALUATION_ABLATIONS = {
    "no data consistency": ["evaluation.data_consistency=false"],
    "no residual decoding": ["v2v.residual_decoding=false"],
}
"""Design choices switched off at evaluation on the full phase's model; 'frozen phase only' evaluates the other."""
TRAINING_ABLATIONS = {
    "no slab-phase input": ["denoiser.slab_phase=false"],
    "z as the only slice axis": ["data.augment.axes=false"],
    "slab phase 0 only": ["data.augment.slab_phases=false"],
    "no flips / transpose": ["data.augment.flips=false"],
    "no HU jitter": ["data.augment.hu_scale=0.0", "data.augment.hu_offset=0.0"],
    "no augmentation at all": ["data.augment.slab_phases=false", "data.augment.axes=false", "data.augment.flips=false",
                               "data.augment.hu_scale=0.0", "data.augment.hu_offset=0.0"],
    "3D UNet denoiser, no slab phase (the previous design)": [
        "denoiser.architecture=unet", "denoiser.slab_phase=false", "denoiser.channels=[16, 32, 64]",
        "denoiser.attention_levels=[false, false, false]", "denoiser.num_res_blocks=1",
        "denoiser.num_head_channels=8", "denoiser.norm_num_groups=8"],
}
"""Ingredients switched off in training: each retrains the frozen phase (--ablate-training)."""


def ctv2v(args: list[str], log: Path, overrides: list[str] = ()) -> float:
    """Run one `ctv2v` command (stdout/stderr to `log`); its wall time in seconds."""
    config_args = [arg for path in CONFIGS for arg in ("--config", str(path))]
    config_args += [arg for override in [*OVERRIDES, *overrides] for arg in ("--set", override)]
    command = [sys.executable, "-m", "pipeline.cli", args[0], *config_args, *args[1:]]
    started = time.monotonic()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed with exit code {result.returncode}; see {log}")
    return time.monotonic() - started


ADAPT_ONLY = ["evaluation.adapt.ema_decay=null"]
""""adapt only" keeps the untrained denoiser's last step: 300 steps from scratch are far from converged, and the
average of the weights (evaluation.adapt.ema_decay, for fine-tuning a trained model) lags them: +0.40 / +0.53 /
+0.56 dB on example_ct / example_ct_sm / the head CT with it, +0.47 / +0.66 / +0.98 without (2026-12-07)."""


def run_branch(out: Path, adapt_seconds: float) -> dict[str, float]:
    """The `main` branch's steps in order, plus the untrained model adapt-only starts from; wall seconds per step."""
    out.mkdir(parents=True, exist_ok=True)
    data, vae = out / "data", out / "vae"
    adapt = [f"evaluation.adapt.seconds={adapt_seconds}"]
    steps = {
        "prepare-data": (["prepare-data", "--out", str(data)], []),
        "train-vae": (["train-vae", "--data", str(data), "--out", str(vae)], []),
        "train frozen": (["train", "--phase", "frozen", "--data", str(data), "--vae", str(vae), "--out",
                          str(out / "frozen")], []),
        "train full": (["train", "--phase", "full", "--data", str(data), "--vae", str(vae), "--init",
                        str(out / "frozen"), "--out", str(out / "full")], []),
        "evaluate (model and model+adapt)": (["evaluate", "--data", str(data), "--model", str(out / "full" / "model"),
                                              "--out", str(out / "evaluate")], adapt),
        "untrained denoiser": (["train", "--phase", "frozen", "--data", str(data), "--vae", str(vae), "--out",
                                str(out / "untrained")], ["training.frozen.epochs=0"]),
        "evaluate (adapt only)": (["evaluate", "--data", str(data), "--model", str(out / "untrained" / "model"),
                                   "--out", str(out / "adapt-only")], adapt + ADAPT_ONLY),
    }
    walls = {}
    for name, (args, overrides) in steps.items():
        walls[name] = ctv2v(args, out / f"{re.sub(r'[^a-z0-9]+', '-', name)}.log", overrides)
        print(f"{name}: {walls[name]:.0f} s", flush=True)
    (out / "wall.json").write_text(json.dumps(walls, indent=2))
    return walls


def ablate(out: Path, training: bool) -> dict[str, dict]:
    """Evaluate reports of each ablation (reused when present): (report, the row it is compared with)."""
    runs = {name: (out / "full" / "model", overrides, "model") for name, overrides in EVALUATION_ABLATIONS.items()}
    runs["frozen phase only"] = (out / "frozen" / "model", [], "model")
    if training:
        for index, (name, overrides) in enumerate(TRAINING_ABLATIONS.items()):
            target = out / f"ablate-training-{index}"
            if not (target / "model").is_dir():
                ctv2v(["train", "--phase", "frozen", "--data", str(out / "data"), "--vae", str(out / "vae"),
                       "--out", str(target)], out / f"ablate-training-{index}.log", overrides)
            runs[f"{name} (frozen phase)"] = (target / "model", overrides, "frozen phase only")
    reports = {}
    for index, (name, (model, overrides, versus)) in enumerate(runs.items()):
        target = out / f"ablation-{index}"
        if not (target / "report.json").is_file():
            ctv2v(["evaluate", "--data", str(out / "data"), "--model", str(model), "--out", str(target)],
                  out / f"ablation-{index}.log", overrides)
        reports[name] = (json.loads((target / "report.json").read_text()), versus)
    return reports


def vae_rows(out: Path) -> dict[str, dict[str, dict]]:
    """Per test volume: the VAE ceiling and the residual-decoding oracle (synthesized-slice scores)."""
    import numpy as np
    import torch

    from ctv2v.config_io import load_config
    from ctv2v.data.interpolation import Interpolation, covered_slices
    from ctv2v.data.prepared import load_split_volumes
    from ctv2v.evaluate.metrics import score_volume
    from ctv2v.intensity import Intensity
    from ctv2v.models.vae import load_vae_artifact

    config = load_config(CONFIGS, OVERRIDES)
    vae = load_vae_artifact(out / "vae").eval()
    intensity = Intensity.from_config(config.data.intensity)
    window = (config.evaluation.hu_min, config.evaluation.hu_max)

    def reconstruct(hu: np.ndarray) -> np.ndarray:
        clip = torch.from_numpy(intensity.to_unit(hu))[None, None]
        with torch.no_grad():
            return intensity.to_hu(vae.decode(vae.encode(clip), tuple(clip.shape[2:]))[0, 0].clamp(0, 1).numpy())

    rows = {}
    for volume in load_split_volumes(out / "data", config, "test"):
        if config.evaluation.volume_ids and volume.volume_id not in config.evaluation.volume_ids:
            continue
        covered, k = covered_slices(volume.thick), volume.thick.factor
        truth = volume.thin[:covered]
        interp = np.clip(Interpolation(config.v2v.interpolation, config.v2v.consistent_interpolation).of(volume),
                         *window)
        thin_recon, interp_recon = reconstruct(volume.thin), reconstruct(interp)
        rows[volume.volume_id] = {
            "VAE ceiling dec(enc(thin))": score_volume(thin_recon[:covered], truth, k, *window)["synthesized"],
            f"oracle {START} + dec(enc(thin)) - dec(enc({START}))":
                score_volume((interp + thin_recon - interp_recon)[:covered], truth, k, *window)["synthesized"],
        }
    return rows


def unseen_scores(out: Path, path: Path, adapt_seconds: float) -> tuple[dict, str]:
    """The trained model (and adapted) with the baselines on a CT of another body region: (scores, description)."""
    import torch

    from ctv2v.config_io import load_config
    from ctv2v.data.cache import Preprocessed
    from ctv2v.data.readers import read_volume
    from ctv2v.data.thick import resample_spacing, simulate_thick
    from ctv2v.evaluate.evaluate import evaluate_volume
    from ctv2v.models.artifacts import load_trained_model

    config = load_config(CONFIGS, [*OVERRIDES, f"evaluation.adapt.seconds={adapt_seconds}"])
    volume = read_volume(path)
    thin, spacing, affine = resample_spacing(volume.array, volume.spacing, volume.affine, config.data.resample)
    unseen = Preprocessed(path.name.split(".")[0], thin, simulate_thick(thin, spacing[0], config.data.thick),
                          spacing, affine)
    started = time.monotonic()
    results = {}
    adapt_only_config = load_config(CONFIGS, [*OVERRIDES, f"evaluation.adapt.seconds={adapt_seconds}", *ADAPT_ONLY])
    for name, model_dir, run_config in (("model", out / "full" / "model", config),
                                        ("adapt only", out / "untrained" / "model", adapt_only_config)):
        model = load_trained_model(model_dir, run_config).eval()
        results[name] = evaluate_volume(model, unseen, run_config, out / "unseen" / name.replace(" ", "-"),
                                        torch.Generator().manual_seed(config.seed), model.vae.weights_label)
    metrics = results["model"].metrics | {"adapt only": results["adapt only"].metrics["model+adapt"]}
    description = (f"{path} resampled to {tuple(round(s, 2) for s in spacing)} mm, shape {thin.shape}, "
                   f"{results['model'].thick_description}, {results['model'].scored_slices} scored slices; "
                   f"adaptation {results['model'].adaptation}; adapt only {results['adapt only'].adaptation}; "
                   f"{time.monotonic() - started:.0f} s")
    return metrics, description


@dataclass(frozen=True)
class ValPoint:
    """One epoch's validation line: val PSNR of the model and of its start on the same val views."""

    epoch: int
    psnr_db: float
    start_psnr_db: float
    loss: float

    def __str__(self) -> str:
        return f"epoch {self.epoch}: {self.psnr_db:.2f} dB (start {self.start_psnr_db:.2f}, val_loss {self.loss:.4f})"


def curves(out: Path) -> dict[str, list[ValPoint]]:
    """Val PSNR (synthesized slices of the val views predicted whole) per epoch of each phase, from the train steps'
    logs."""
    found = {}
    for phase in ("frozen", "full"):
        points = []
        for line in (out / f"train-{phase}.log").read_text().splitlines():
            match = VALIDATION_LINE.search(line)
            if match and match.group(1) == phase:
                values = dict(item.rsplit(" ", 1) for item in match.group(3).split(", "))
                points.append(ValPoint(int(match.group(2)), float(values["val_psnr_db_synthesized"]),
                                       float(values["val_interp_psnr_db_synthesized"]), float(values["val_loss"])))
        if not points:
            raise SystemExit(f"{out}/train-{phase}.log holds no validation line of phase {phase}")
        found[phase] = points
    return found


def curve_floor(frozen: list[ValPoint]) -> tuple[str, bool]:
    """Issue 18: the val PSNR rises over training (the frozen phase's last epoch above its first)."""
    first, last = frozen[0], frozen[-1]
    return (f"val PSNR rises over the frozen phase (epoch {first.epoch} {first.psnr_db:.2f} dB -> epoch "
            f"{last.epoch} {last.psnr_db:.2f} dB; start {last.start_psnr_db:.2f})", last.psnr_db > first.psnr_db)


def fmt(score: dict, start: dict) -> str:
    return (f"{score['psnr_db']:.2f} / {score['ssim_3d']:.4f} / {score['mae_hu']:.1f} | "
            f"{score['psnr_db'] - start['psnr_db']:+.2f} dB / {score['ssim_3d'] - start['ssim_3d']:+.4f}")


def table(rows: dict[str, dict], start: dict) -> None:
    print("| method | PSNR / SSIM-3D / MAE | gain over the start (PSNR / SSIM-3D) |\n| --- | --- | --- |")
    for name, score in rows.items():
        print(f"| {name} | {fmt(score, start)} |")


def floors(per_volume: dict[str, dict[str, dict]]) -> list[tuple[str, bool]]:
    """Issue 18's floors on the given volumes' synthesized scores."""
    def gain(volume: dict, method: str) -> float:
        return volume[method]["psnr_db"] - volume[START]["psnr_db"]

    checks = []
    for vid, volume in per_volume.items():
        checks += [
            (f"{vid}: model >= {START} + 0.5 dB ({gain(volume, 'model'):+.2f})", gain(volume, "model") >= 0.5),
            (f"{vid}: model SSIM-3D >= {START}'s ({volume['model']['ssim_3d']:.4f} vs "
             f"{volume[START]['ssim_3d']:.4f})", volume["model"]["ssim_3d"] >= volume[START]["ssim_3d"]),
        ]
        if "model+adapt" in volume:
            checks.append((f"{vid}: model+adapt above the model ({gain(volume, 'model+adapt'):+.2f} vs "
                           f"{gain(volume, 'model'):+.2f})", gain(volume, "model+adapt") > gain(volume, "model")))
        if "adapt only" in volume:
            checks.append((f"{vid}: adapt only >= {START} + 0.4 dB ({gain(volume, 'adapt only'):+.2f})",
                           gain(volume, "adapt only") >= 0.4))
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reuse", action="store_true", help="score the finished run in --out instead of training")
    parser.add_argument("--adapt", type=float, default=120.0, metavar="SECONDS",
                        help="test-time adaptation budget per scan (evaluation.adapt.seconds)")
    parser.add_argument("--ablate-training", action="store_true",
                        help="also retrain the frozen phase once per ingredient switched off (slow)")
    parser.add_argument("--unseen", type=Path, help="a CT of another body region to score the model on too")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config override for every step, e.g. --set training.frozen.epochs=32 (repeatable)")
    args = parser.parse_args()
    OVERRIDES.extend(args.overrides)
    out = args.out.resolve()
    walls = json.loads((out / "wall.json").read_text()) if args.reuse else run_branch(out, args.adapt)
    report = json.loads((out / "evaluate" / "report.json").read_text())
    adapt_only = {v["id"]: v for v in json.loads((out / "adapt-only" / "report.json").read_text())["volumes"]}
    ablations = ablate(out, args.ablate_training)
    vae = vae_rows(out)

    print(f"\n# cpu-quality `main` (configs/main.yaml + configs/cpu-quality.yaml), seed {report['seed']}")
    settings = report["model_settings"]
    print(f"thick: {report['thick']}, resample {settings['resample']}, HU {report['hu_range']}, "
          f"{report['sample_steps']} sampling step(s), v2v {settings['v2v']}, diffusion {settings['diffusion']}")
    print(f"data consistency: {settings['data_consistency']}; test-time adaptation: {settings['adapt']} "
          f"(adapt only: {', '.join(ADAPT_ONLY)}); overrides: {OVERRIDES or 'none'}")
    print("scores on synthesized slices: PSNR dB / SSIM-3D / MAE HU | gain over the model's start\n")
    headline = {}
    for volume in report["volumes"]:
        vid, metrics = volume["id"], volume["metrics"]
        scores = {method: s["synthesized"] for method, s in metrics.items()}
        scores["adapt only"] = adapt_only[vid]["metrics"]["model+adapt"]["synthesized"]
        for name, (ablation, _) in ablations.items():
            scores[f"ablation: {name}"] = next(
                v for v in ablation["volumes"] if v["id"] == vid)["metrics"]["model"]["synthesized"]
        scores.update(vae.get(vid, {}))
        order = [START, "model", "model+adapt", "adapt only"]
        rows = {name: scores[name] for name in order} | {k: v for k, v in scores.items() if k not in order}
        print(f"## {vid} ({volume['thick_description']}, {volume['scored_slices']} scored slices; adaptation: "
              f"{volume.get('adaptation')}; adapt only: {adapt_only[vid].get('adaptation')})")
        table(rows, scores[START])
        print()
        headline[vid] = scores
    if args.unseen is not None:
        metrics, description = unseen_scores(out, args.unseen.resolve(), args.adapt)
        scores = {method: s["synthesized"] for method, s in metrics.items()}
        print(f"## unseen body region: {description}")
        order = [START, "model", "model+adapt", "adapt only"]
        table({name: scores[name] for name in order} | {k: v for k, v in scores.items() if k not in order},
              scores[START])
        print()
        headline["unseen " + args.unseen.name] = scores
    val_curves = curves(out)
    print("## floors (issue 18)")
    for text, passed in [*floors(headline), curve_floor(val_curves["frozen"])]:
        print(f"- {'PASS' if passed else 'FAIL'}: {text}")
    print()
    for phase, points in val_curves.items():
        print(f"val PSNR over training, {phase} phase: " + "; ".join(map(str, points)))
    print("\nwall time per step: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in walls.items())
          + f"; total {sum(walls.values()) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
