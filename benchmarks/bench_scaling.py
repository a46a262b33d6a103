"""Scaling benchmark: DDP training steps/s on one "node" and two, the communication share per step, and the
estimated GPU memory of every V100 preset.

    .venv/bin/python benchmarks/bench_scaling.py [--steps 6] [--rounds 2] [--global-batch 4] [--skip-memory]

Cases, all at the same global batch G (CPU, gloo, the smoke-size `main` model of configs/main.yaml +
configs/smoke.yaml, frozen phase without latent cache, AdamW): one process with batch G; two processes of
batch G/2 on one node (`torchrun --standalone`); two "nodes" of one process of batch G/2 each (two torchrun
launchers, `--nnodes 2`, c10d rendezvous on 127.0.0.1). Each process uses one torch thread, as each GPU is
one device (two OpenMP threads per process on this loaded 2-core machine spin-waited a step to 15x its time).
The communication share is
1 - t(no_sync step) / t(step): the time DDP's gradient all-reduce adds, measured as the difference between
steps with and without it. Cases take turns per round, so background load hits them alike; medians.
The memory table is ctv2v.train.estimate's estimate of every preset (configs/<variant>.yaml + the card
overlay) at its configured batch, allowance included.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from ctv2v.config import VARIANTS
from ctv2v.config_io import load_config
from ctv2v.train.estimate import CARDS, estimate_peak_bytes, phase_batch, with_allowance


# ------------------------------------------------------------------------------ one torchrun process
def worker(out: Path, batch: int, steps: int) -> None:
    """Time `steps` DDP steps with and without the gradient all-reduce; rank 0 writes the medians to `out`."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ctv2v.models.v2v import build_model
    from ctv2v.models.vae import build_untrained_vae
    from ctv2v.device import distributed_from_env, process_group
    from ctv2v.train.estimate import random_batch, set_phase
    from ctv2v.train.objectives import DiffusionObjective

    dist_info = distributed_from_env()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    with process_group(dist_info, torch.device("cpu")):
        torch.manual_seed(0)
        config = load_config([REPO / "configs" / "main.yaml", REPO / "configs" / "smoke.yaml"],
                             ["training.latent_cache=false"])
        model = build_model(config, build_untrained_vae(config))
        set_phase(model, "frozen")
        objective = DiffusionObjective(model)
        trained = DistributedDataParallel(objective) if dist_info.enabled else objective
        optimizer = torch.optim.AdamW(model.param_groups(1e-4, 0.0, 0.01))
        torch.manual_seed(1 + dist_info.rank)

        def step(sync: bool) -> float:
            data = random_batch(model, config, "frozen", batch)
            if dist_info.enabled:
                dist.barrier()  # every rank starts together: waiting for a slower rank is not communication
            start = time.perf_counter()
            with nullcontext() if sync or not dist_info.enabled else trained.no_sync():
                trained(data)[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        for _ in range(2):
            step(True)
        timed = {"sync": [], "no_sync": []}
        for _ in range(steps):
            timed["sync"].append(step(True))
            timed["no_sync"].append(step(False))
        if dist_info.is_main:
            out.write_text(json.dumps({key: statistics.median(values) for key, values in timed.items()}))


# --------------------------------------------------------------------------------------- the cases
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_case(case: str, global_batch: int, steps: int) -> dict[str, float]:
    """Median step times of one case, each in fresh processes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = [str(Path(__file__).resolve()), "--worker"]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "times.json"
        if case == "1 process":
            commands = [[sys.executable, *script, str(out), str(global_batch), str(steps)]]
        elif case == "2 processes, 1 node":
            commands = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         *script, str(out), str(global_batch // 2), str(steps)]]
        else:
            port = _free_port()
            commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                         "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                         "--rdzv-id", "bench", *script, str(out), str(global_batch // 2), str(steps)]
                        for rank in (0, 1)]
        processes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True) for command in commands]
        errors = [process.communicate()[1] for process in processes]
        if any(process.returncode for process in processes):
            raise RuntimeError(f"{case} failed:\n" + "\n".join(error[-2000:] for error in errors))
        return json.loads(out.read_text())


CASES = ("1 process", "2 processes, 1 node", "2 nodes x 1 process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.global_batch % 2:
        parser.error("--global-batch must be even (two processes share it)")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, load average at start {os.getloadavg()[0]:.1f} "
          "(other processes on the machine slow every timing)")
    print(f"\n## DDP steps/s at global batch {args.global_batch} (smoke-size main, frozen phase, gloo on CPU)")
    print(f"median of {args.steps} steps x {args.rounds} rounds after 2 warm-up steps; cases take turns per round")
    results: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            results[case].append(run_case(case, args.global_batch, args.steps))
    print("| case | micro-batch | steps/s | step s | no-all-reduce step s | communication share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for case in CASES:
        sync = statistics.median(r["sync"] for r in results[case])
        no_sync = statistics.median(r["no_sync"] for r in results[case])
        share = max(0.0, 1 - no_sync / sync) if case != "1 process" else 0.0
        batch = args.global_batch if case == "1 process" else args.global_batch // 2
        print(f"| {case} | {batch} | {1 / sync:.2f} | {sync:.3f} | {no_sync:.3f} | {share:.0%} |")

    if not args.skip_memory:
        print("\n## Estimated peak GPU memory per process, every V100 preset at its configured batch")
        print("configs/<variant>.yaml + configs/<card>.yaml; MemTracker under FakeTensorMode, one fp16 step with "
              "AdamW state, + allowance (ctv2v.train.estimate)")
        print("| preset | variant | phase | batch | est. peak | of card |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for card, card_bytes in CARDS.items():
            for variant in VARIANTS:
                config = load_config([REPO / "configs" / f"{variant}.yaml", REPO / "configs" / f"{card}.yaml"])
                for phase in ("frozen", "full"):
                    (tracked,) = estimate_peak_bytes(config, phase)
                    peak = with_allowance(tracked)
                    print(f"| {card} | {variant} | {phase} | {phase_batch(config, phase)} | "
                          f"{peak / 2**30:.2f} GiB | {peak / card_bytes:.0%} |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
