"""Device, precision and process-group setup for training.

Precision follows the hardware we run on: V100 (sm_70) has no bf16, so `auto` means fp16 autocast with a
GradScaler on CUDA and plain fp32 on CPU. A torch build without kernels for the GPU fails only at the first
kernel launch ("no kernel image is available for execution on the device"), minutes into a pod's life; the
arch check below turns that into an error at start that names the build and the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested device or precision cannot run here; the message says why and what to change."""


# ------------------------------------------------------------------------------------------- devices
def select_device(setting: str, local_rank: int = 0) -> torch.device:
    """`auto` -> CUDA when available else CPU; `cuda` without a GPU is an error, never a silent CPU run."""
    if setting not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device must be auto, cpu or cuda, got {setting!r}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device: cuda was requested but torch {torch.__version__} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda or 'none, this is a CPU build'})"
        )
    device = torch.device("cuda", local_rank)
    check_gpu_supported(
        torch.cuda.get_arch_list(),
        torch.cuda.get_device_capability(device),
        torch.cuda.get_device_name(device),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
    )
    torch.cuda.set_device(device)
    return device


def inference_memory_format(device: torch.device) -> torch.memory_format:
    """The layout a VAE's 3D convolutions predict fastest in on `device`: channels_last_3d on CPU, where oneDNN ran
    `predict` 1.15x (cpu-quality) to 1.4x (smoke) faster per CPU second than the default layout on the demo
    abdomen, outputs within 0.3 HU (benchmarks/bench_predict.py models, 2026-12-07); the default layout on a GPU,
    where it was not measured."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


_ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)([a-z]?)$")


def arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether a compiled arch entry (`sm_70`, `compute_90`, `sm_90a`) can execute on a GPU of `capability`.

    CUDA's compatibility rules: a cubin `sm_XY` runs on major X with minor >= Y; PTX `compute_XY` is
    JIT-compiled for any later capability; arch-specific `sm_XYa` runs only on exactly X.Y.
    """
    match = _ARCH.match(arch)
    if match is None:
        return False
    kind, major, minor, suffix = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    if suffix:
        return (major, minor) == capability
    if kind == "compute":
        return (major, minor) <= capability
    return major == capability[0] and minor <= capability[1]


def check_gpu_supported(
    arch_list: list[str],
    capability: tuple[int, int],
    device_name: str,
    *,
    torch_version: str = "",
    cuda_version: str | None = None,
) -> None:
    """Raise DeviceError when no entry of torch's compiled `arch_list` can run on a GPU of `capability`."""
    if any(arch_runs_on(arch, capability) for arch in arch_list):
        return
    sm = f"sm_{capability[0]}{capability[1]}"
    hint = ""
    if capability == (7, 0):
        hint = (" Volta (V100, sm_70) kernels ship only in PyTorch's CUDA 12.6 builds (torch 2.11+): "
                "install torch from the cu126 index.")
    raise DeviceError(
        f"torch {torch_version} (CUDA {cuda_version}) has no kernels for {device_name} ({sm}); "
        f"compiled for {', '.join(arch_list) or 'no GPU arch'}.{hint}"
    )


# ----------------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """How forward passes run: an autocast dtype (None = fp32) and whether a GradScaler guards fp16 gradients."""

    name: str
    autocast_dtype: torch.dtype | None
    grad_scaler: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for fp16 (disabled it passes steps through unchanged)."""
        return torch.amp.GradScaler(device.type, enabled=self.grad_scaler)


def resolve_precision(setting: str, device: torch.device, bf16_supported: bool | None = None) -> Precision:
    """training.precision -> Precision for `device`; combinations that cannot run are errors, not fallbacks."""
    if device.type == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        if setting in ("auto", "fp16"):
            return Precision("fp16", torch.float16, grad_scaler=True)
        if setting == "bf16":
            if not bf16_supported:
                raise DeviceError(
                    "training.precision: bf16 was requested but this GPU has no bf16 support "
                    "(V100 has none): use fp16 or auto"
                )
            return Precision("bf16", torch.bfloat16, grad_scaler=False)
        if setting == "fp32":
            return Precision("fp32", None, grad_scaler=False)
    elif device.type == "cpu":
        if setting in ("auto", "fp32"):
            return Precision("fp32", None, grad_scaler=False)
        if setting in ("fp16", "bf16"):
            raise DeviceError(
                f"training.precision: {setting} needs a CUDA device; on CPU use fp32 or auto "
                "(CPU half-precision autocast fails in the MAISI VAE and is slower than fp32 here)"
            )
    raise DeviceError(f"training.precision {setting!r} on device {device} is not supported")


# ---------------------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch (a single process has rank 0 of world size 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def distributed_from_env() -> Distributed:
    """Read RANK / WORLD_SIZE / LOCAL_RANK as set by `torchrun`; absent means one process."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise DeviceError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers: {exc}") from exc
    if not 0 <= rank < world_size:
        raise DeviceError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return Distributed(rank, world_size, local_rank)


@contextlib.contextmanager
def process_group(dist_info: Distributed, device: torch.device,
                  timeout: timedelta | None = None) -> Iterator[None]:
    """Initialise torch.distributed for a multi-process launch (nccl on CUDA, gloo on CPU) and tear it down.

    `timeout`: how long a collective may wait (None: torch's default).
    """
    if not dist_info.enabled or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=dist_info.rank, world_size=dist_info.world_size, timeout=timeout)
    log.info("process group %s: rank %d of %d", backend, dist_info.rank, dist_info.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
