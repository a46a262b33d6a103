"""Model benchmarks: CPU step time / peak RSS at the smoke size, FLOPs per step, estimated V100 peak memory,
and MAISI encoding modes side by side.

    .venv/bin/python benchmarks/bench_models.py [--repeats 3] [--skip-cpu] [--skip-gpu-estimate] [--skip-maisi]

GPU memory is estimated without a GPU (FIELD_NOTES "Estimating GPU memory without a GPU"): the model and an
AdamW optimizer are built under FakeTensorMode on CPU, the forward pass runs under fp16 autocast, and
torch's MemTracker records the peak of one training step with AdamW's state in place (ctv2v.train.estimate).
Gradient checkpointing and the other memory options come from the V100 overlay itself. Not included: the
CUDA context (~0.3-0.5 GB), cuDNN workspaces and allocator fragmentation, hence the 90% budget.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctv2v.config import MaisiVAEConfig, RunConfig
from ctv2v.config_io import load_config
from ctv2v.models.maisi import MAISI_CT_ARCH
from ctv2v.models.v2v import build_model
from ctv2v.models.vae import MaisiVAE, build_untrained_vae
from ctv2v.train.estimate import (
    CARDS,
    count_step_flops,
    estimate_peak_bytes,
    phase_batch,
    set_phase,
    training_step,
)

VARIANTS = ["main", "pretrained"]
BUDGET = 0.9
PHASES = ("frozen", "full")


def config_for(variant: str, overlay: str) -> RunConfig:
    return load_config([REPO / "configs" / f"{variant}.yaml", REPO / "configs" / f"{overlay}.yaml"])


# ---------------------------------------------------------------------------------- CPU at smoke size
def _cpu_steps(variant: str, repeats: int, queue: mp.Queue) -> None:
    torch.manual_seed(0)
    config = config_for(variant, "smoke")
    model = build_model(config, build_untrained_vae(config))
    result = {}
    for phase in PHASES:
        set_phase(model, phase)
        optimizer = torch.optim.AdamW(model.param_groups(1e-4, 0.1, 0.01))
        training_step(model, config, phase, optimizer)  # warm-up: first calls are several times slower
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            training_step(model, config, phase, optimizer)
            times.append(time.perf_counter() - start)
        result[phase] = statistics.median(times)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


def cpu_smoke(variant: str, repeats: int) -> dict:
    """Median CPU step time per phase and the process's peak RSS, in a fresh process per variant."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_steps, args=(variant, repeats, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# ------------------------------------------------------------------------------------ MAISI encoding
def maisi_modes(repeats: int, shape=(1, 1, 16, 64, 64)) -> dict[str, tuple[float, float]]:
    """Median encode and decode seconds per MAISI encode mode on the same clip (random weights, eval, no_grad).

    The modes take turns within each repeat, so background load on the machine hits them alike.
    """
    torch.manual_seed(0)
    state = MaisiVAE(MAISI_CT_ARCH).state_dict()
    clip = torch.rand(shape)
    tile = {"depth": 16, "height": 32, "width": 32, "overlap": 0.25}
    vaes = {}
    for mode in ("volume", "stack", "tiled"):
        vaes[mode] = MaisiVAE(MAISI_CT_ARCH, MaisiVAEConfig(encode_mode=mode, stack_size=4, tile=tile))
        vaes[mode].load_state_dict(state)
        vaes[mode].eval()
    times: dict[str, tuple[list[float], list[float]]] = {mode: ([], []) for mode in vaes}
    with torch.no_grad():
        for vae in vaes.values():
            vae.decode(vae.encode(clip))  # warm-up
        for _ in range(repeats):
            for mode, vae in vaes.items():
                start = time.perf_counter()
                latent = vae.encode(clip)
                times[mode][0].append(time.perf_counter() - start)
                start = time.perf_counter()
                vae.decode(latent)
                times[mode][1].append(time.perf_counter() - start)
    return {mode: (statistics.median(enc), statistics.median(dec)) for mode, (enc, dec) in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-gpu-estimate", action="store_true")
    parser.add_argument("--skip-maisi", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"load average at start {os.getloadavg()[0]:.1f} (other processes on the machine slow every timing)")

    if not args.skip_cpu:
        print("\n## CPU training step at the smoke size (configs/<variant>.yaml + configs/smoke.yaml, fp32)")
        print(f"median of {args.repeats} steps after one warm-up; RSS = peak of a fresh process (incl. imports)")
        print("| variant | clip (B,1,T,H,W) | frozen step | full step | frozen GFLOP | full GFLOP | peak RSS |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for variant in VARIANTS:
            config = config_for(variant, "smoke")
            r = cpu_smoke(variant, args.repeats)
            flops = {p: count_step_flops(config, p) / 1e9 for p in PHASES}
            clip = config.data.clip
            print(f"| {variant} | ({config.training.full.batch_size},1,{clip.frames},{clip.height},{clip.width}) "
                  f"| {r['frozen']:.3f} s | {r['full']:.3f} s | {flops['frozen']:.1f} | {flops['full']:.1f} "
                  f"| {r['peak_rss_mib']:.0f} MiB |")

    if not args.skip_gpu_estimate:
        print("\n## Estimated peak CUDA tensor memory per V100 preset (configs/<variant>.yaml + overlay)")
        print("FakeTensorMode + fp16 autocast + MemTracker, one step with AdamW state; budget = 90% of the card "
              "(16e9 / 32e9 bytes)")
        print("| preset | variant | phase | batch | GFLOP/step | est. peak | budget | fits |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        over = []
        for overlay, card in CARDS.items():
            for variant in VARIANTS:
                config = config_for(variant, overlay)
                for phase in PHASES:
                    start = time.perf_counter()
                    (peak,) = estimate_peak_bytes(config, phase)
                    flops = count_step_flops(config, phase) / 1e9
                    batch = phase_batch(config, phase)
                    fits = peak <= BUDGET * card
                    if not fits:
                        over.append(f"{overlay} {variant} {phase}")
                    print(f"| {overlay} | {variant} | {phase} | {batch} | {flops:,.0f} | {peak / 2**30:.2f} GiB "
                          f"| {BUDGET * card / 2**30:.2f} GiB | {'yes' if fits else 'NO'} |"
                          f"  <!-- {time.perf_counter() - start:.0f} s -->")
        print("over budget: " + (", ".join(over) if over else "none"))

    if not args.skip_maisi:
        print("\n## MAISI encoding modes, same clip (1,1,16,64,64), CT architecture with random weights")
        print(f"eval, no_grad, num_splits=1, stack_size=4, tiles 16x32x32 overlap 0.25; median of {args.repeats}")
        print("| mode | encode | decode |")
        print("| --- | --- | --- |")
        for mode, (enc, dec) in maisi_modes(args.repeats).items():
            print(f"| {mode} | {enc:.2f} s | {dec:.2f} s |")
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
