"""Test helper: the real `train` step, and afterwards a hash of this rank's trained weights in OUT/hash-rank<r>.json.

Called by torchrun processes through a torchrun call file (ctv2v.steps.context), as a multi-GPU or multi-node
step calls ctv2v.steps.train.train_step; only the hash is added, so the test can compare every rank's weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

import ctv2v.steps.train as train_module


def train_recording_weights(config, out_dir: Path, **arguments: Any):
    """train_step, recording the sha256 of each rank's trained modules and its world size."""
    real_loop = train_module.train_loop

    def loop_then_hash(job):
        result = real_loop(job)
        digest = hashlib.sha256()
        for name, module in sorted(job.states.items()):
            for key, tensor in module.state_dict().items():
                digest.update(f"{name}.{key}".encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        rank = dist.get_rank() if dist.is_initialized() else 0
        Path(out_dir, f"hash-rank{rank}.json").write_text(json.dumps({
            "weights": digest.hexdigest(), "world_size": job.dist_info.world_size, "steps": result.global_step}))
        return result

    train_module.train_loop = loop_then_hash
    try:
        return train_module.train_step(config, out_dir=out_dir, **arguments)
    finally:
        train_module.train_loop = real_loop
