"""Model benchmarks: CPU step time / peak RSS at the smoke size, FLOPs per step, estimated V100 peak memory,
and MAISI encoding modes side by side.

    .venv/bin/python benchmarks/bench_models.py [--repeats 3] [--skip-cpu] [--skip-gpu-estimate] [--skip-maisi]

GPU memory is estimated without a GPU (FIELD_NOTES "Estimating GPU memory without a GPU"): the model and an
AdamW optimizer are built under FakeTensorMode on CPU, the forward pass runs under fp16 autocast, and
torch's MemTracker records the peak of two full training steps (the second one holds the optimizer state).
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
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ctv2v.config import MaisiVAEConfig, RunConfig
from ctv2v.config_io import load_config
from ctv2v.models.maisi import MAISI_CT_ARCH  # noqa: E402
from ctv2v.models.v2v import build_model  # noqa: E402
from ctv2v.train.estimate import count_step_flops, set_phase, step_loss, training_step  # noqa: E402
from ctv2v.models.vae import MaisiVAE, build_untrained_vae  # noqa: E402

VARIANTS = ["main", "pretrained"]
CARDS = {"v100-16gb": 16e9, "v100-32gb": 32e9}
"""Card memory in bytes, taken as decimal GB (below the ~16.16 / ~32.5 GiB-class totals nvidia-smi reports)."""
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


# ------------------------------------------------------------------------------- V100 memory estimate
class _StepForward(nn.Module):
    """One training forward pass as a module call: MemTracker refuses a module called twice at top level (the
    VAE encodes thin and thick clips), but accepts repeated calls below a parent module."""

    def __init__(self, model: nn.Module, config: RunConfig, phase: str):
        super().__init__()
        self.model, self.config, self.phase = model, config, phase

    def forward(self) -> torch.Tensor:
        return step_loss(self.model, self.config, self.phase, autocast=torch.float16)


def estimate_peak_bytes(config: RunConfig, phase: str) -> int:
    """Peak tensor memory of two fp16-autocast training steps of `phase`, from shapes only."""
    with FakeTensorMode():
        model = build_model(config, build_untrained_vae(config))
        set_phase(model, phase)
        full = config.training.full
        optimizer = torch.optim.AdamW(model.param_groups(full.lr, full.vae_lr_multiplier,
                                                         config.training.weight_decay))
        if phase == "frozen":
            # MemTracker hooks the gradient of every parameter of a called module and fails on frozen ones. The
            # frozen VAE still runs under no_grad and is not in the optimizer, so no gradient ever materializes.
            model.vae.requires_grad_(True)
        step = _StepForward(model, config, phase)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for _ in range(2):
                step().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_mod_stats()
        peak = tracker.get_tracker_snapshot("peak")
    return max(snapshot["Total"] for snapshot in peak.values())


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
        print("FakeTensorMode + fp16 autocast + MemTracker, AdamW, 2 steps; budget = 90% of the card "
              "(16e9 / 32e9 bytes)")
        print("| preset | variant | phase | batch | GFLOP/step | est. peak | budget | fits |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        over = []
        for overlay, card in CARDS.items():
            for variant in VARIANTS:
                config = config_for(variant, overlay)
                for phase in PHASES:
                    start = time.perf_counter()
                    peak = estimate_peak_bytes(config, phase)
                    flops = count_step_flops(config, phase) / 1e9
                    batch = getattr(config.training, phase).batch_size
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
