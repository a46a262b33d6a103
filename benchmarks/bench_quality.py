"""Issue 11's quality benchmark: the cpu-quality `main` branch against interpolation, with its ablations.

Runs the branch's steps with the command lines the pipeline runs (prepare-data, train-vae, train --phase
frozen, train --phase full, evaluate; configs/main.yaml + configs/cpu-quality.yaml), each timed, into --out.
Then prints, per demo test volume (synthesized slices, PSNR dB / SSIM-3D / MAE HU):
- the model (the full phase's model, as the evaluate step scored it) and the `+dc` baselines it is compared with;
- the VAE ceiling decode(encode(thin)) and the residual-decoding oracle interpolation + decode(encode(thin)) -
  decode(encode(interpolation)) (what a perfect denoiser reaches with this VAE), whole volumes encoded at once;
- nearest / linear / cubic interpolation;
- ablations: each design choice switched off on the same trained models (evaluate --set ...);
- the val PSNR per epoch of both phases (the train steps' validation lines), and the wall time of every step.

    python benchmarks/bench_quality.py --out /tmp/bench-quality        # ~25 min on 2 quiet cores
    python benchmarks/bench_quality.py --out /tmp/bench-quality --reuse  # re-score a finished run
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "configs" / "main.yaml", REPO / "configs" / "cpu-quality.yaml"]
OVERRIDES: list[str] = []
"""--set overrides given to the benchmark, passed to every step (and to the VAE rows' config)."""
VALIDATION_LINE = re.compile(r"(\w+) epoch (\d+) validation: (.*)")

ABLATIONS = {
    "no data consistency": ["evaluation.data_consistency=false"],
    "no residual decoding": ["v2v.residual_decoding=false"],
    "4 sampling steps (instead of 1)": ["evaluation.sample_steps=4"],
}
"""Design choices switched off at evaluation on the full phase's model; 'frozen phase only' evaluates the other."""


def ctv2v(args: list[str], log: Path) -> float:
    """Run one `ctv2v` command (stdout/stderr to `log`); its wall time in seconds."""
    config_args = [arg for path in CONFIGS for arg in ("--config", str(path))]
    config_args += [arg for override in OVERRIDES for arg in ("--set", override)]
    command = [sys.executable, "-m", "pipeline.cli", args[0], *config_args, *args[1:]]
    started = time.monotonic()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` failed with exit code {result.returncode}; see {log}")
    return time.monotonic() - started


def run_branch(out: Path) -> dict[str, float]:
    """The `main` branch's steps in order; wall seconds per step."""
    out.mkdir(parents=True, exist_ok=True)
    data, vae = out / "data", out / "vae"
    steps = {
        "prepare-data": ["prepare-data", "--out", str(data)],
        "train-vae": ["train-vae", "--data", str(data), "--out", str(vae)],
        "train frozen": ["train", "--phase", "frozen", "--data", str(data), "--vae", str(vae), "--out",
                         str(out / "frozen")],
        "train full": ["train", "--phase", "full", "--data", str(data), "--vae", str(vae), "--init",
                       str(out / "frozen"), "--out", str(out / "full")],
        "evaluate": ["evaluate", "--data", str(data), "--model", str(out / "full" / "model"), "--out",
                     str(out / "evaluate")],
    }
    walls = {}
    for name, args in steps.items():
        walls[name] = ctv2v(args, out / f"{name.replace(' ', '-')}.log")
        print(f"{name}: {walls[name]:.0f} s", flush=True)
    (out / "wall.json").write_text(json.dumps(walls, indent=2))
    return walls


def ablate(out: Path) -> dict[str, dict]:
    """Evaluate reports of each ablation (reused when present)."""
    runs = {name: (out / "full" / "model", overrides) for name, overrides in ABLATIONS.items()}
    runs["frozen phase only"] = (out / "frozen" / "model", [])
    reports = {}
    for index, (name, (model, overrides)) in enumerate(runs.items()):
        target = out / f"ablation-{index}"
        if not (target / "report.json").is_file():
            sets = [arg for override in overrides for arg in ("--set", override)]
            ctv2v(["evaluate", "--data", str(out / "data"), "--model", str(model), "--out", str(target), *sets],
                  out / f"ablation-{index}.log")
        reports[name] = json.loads((target / "report.json").read_text())
    return reports


def vae_rows(out: Path) -> dict[str, dict[str, dict]]:
    """Per test volume: the VAE ceiling and the residual-decoding oracle (synthesized-slice scores)."""
    import numpy as np
    import torch

    from ctv2v.data.interpolation import covered_slices
    from ctv2v.config_io import load_config
    from ctv2v.data.interpolation import Interpolation
    from ctv2v.data.prepared import load_split_volumes
    from ctv2v.intensity import Intensity
    from ctv2v.evaluate.metrics import score_volume
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
        start = config.v2v.interpolation + ("+dc" if config.v2v.consistent_interpolation else "")
        rows[volume.volume_id] = {
            "VAE ceiling dec(enc(thin))": score_volume(thin_recon[:covered], truth, k, *window)["synthesized"],
            f"oracle {start} + dec(enc(thin)) - dec(enc({start}))":
                score_volume((interp + thin_recon - interp_recon)[:covered], truth, k, *window)["synthesized"],
        }
    return rows


def curves(out: Path) -> dict[str, list[str]]:
    """Val PSNR (synthesized slices of the val clips) per epoch of each phase, from the train steps' logs."""
    found = {}
    for phase in ("frozen", "full"):
        points = []
        for line in (out / f"train-{phase}.log").read_text().splitlines():
            match = VALIDATION_LINE.search(line)
            if match and match.group(1) == phase:
                values = dict(item.rsplit(" ", 1) for item in match.group(3).split(", "))
                points.append(f"epoch {match.group(2)}: {float(values['val_psnr_db_synthesized']):.2f} dB "
                              f"(start {float(values['val_interp_psnr_db_synthesized']):.2f}, "
                              f"val_loss {float(values['val_loss']):.4f})")
        if not points:
            raise SystemExit(f"{out}/train-{phase}.log holds no validation line of phase {phase}")
        found[phase] = points
    return found


def fmt(score: dict) -> str:
    return f"{score['psnr_db']:.2f} / {score['ssim_3d']:.4f} / {score['mae_hu']:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reuse", action="store_true", help="score the finished run in --out instead of training")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config override for every step, e.g. --set training.frozen.epochs=32 (repeatable)")
    args = parser.parse_args()
    OVERRIDES.extend(args.overrides)
    out = args.out.resolve()
    walls = json.loads((out / "wall.json").read_text()) if args.reuse else run_branch(out)
    report = json.loads((out / "evaluate" / "report.json").read_text())
    ablations = ablate(out)
    vae = vae_rows(out)

    print(f"\n# cpu-quality `main` (configs/main.yaml + configs/cpu-quality.yaml), seed {report['seed']}")
    settings = report["model_settings"]
    print(f"thick: {report['thick']}, resample {settings['resample']}, HU {report['hu_range']}, "
          f"{report['sample_steps']} sampling steps, v2v {settings['v2v']}, diffusion {settings['diffusion']}")
    print(f"data consistency: {settings['data_consistency']}; overrides: {OVERRIDES or 'none'}")
    print("scores on synthesized slices: PSNR dB / SSIM-3D / MAE HU\n")
    for volume in report["volumes"]:
        vid, metrics = volume["id"], volume["metrics"]
        print(f"## {vid} ({volume['thick_description']}, {volume['scored_slices']} scored slices)")
        print("| method | PSNR / SSIM-3D / MAE |\n| --- | --- |")
        for method, scores in metrics.items():
            print(f"| {method} | {fmt(scores['synthesized'])} |")
        for name, score in vae.get(vid, {}).items():
            print(f"| {name} | {fmt(score)} |")
        for name, ablation in ablations.items():
            scored = next(v for v in ablation["volumes"] if v["id"] == vid)["metrics"]["model"]["synthesized"]
            print(f"| ablation: {name} | {fmt(scored)} |")
        model = metrics["model"]["synthesized"]
        references = {m: s["synthesized"] for m, s in metrics.items() if m != "model"}
        best = max(references, key=lambda m: references[m]["psnr_db"])
        print(f"\nmodel - linear: {model['psnr_db'] - metrics['linear']['synthesized']['psnr_db']:+.2f} dB; "
              f"model - best non-learned reference ({best}): {model['psnr_db'] - references[best]['psnr_db']:+.2f} dB\n")
    for phase, points in curves(out).items():
        print(f"val PSNR over training, {phase} phase: " + "; ".join(points))
    print("\nwall time per step: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in walls.items())
          + f"; total {sum(walls.values()) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
