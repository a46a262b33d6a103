"""Test helper run by tests/train/test_ddp.py under `python -m torch.distributed.run`: a few full-phase steps with DDP.

Each rank trains into its own folder, so the test can see which rank wrote checkpoints, and writes a hash of
its model's parameters before and after training, so the test can compare the ranks' weights.

Usage: ddp_train_script.py DATA_DIR VAE_DIR OUT_DIR KEY=VALUE...  (config overrides on configs/smoke.yaml)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from ctv2v.config_io import load_config
from ctv2v.data.clips import TrainClips
from ctv2v.data.prepared import load_split_volumes
from ctv2v.device import process_group
from ctv2v.intensity import Intensity
from ctv2v.models.v2v import build_model
from ctv2v.train.loop import TrainJob, runtime_from_env, train_loop
from ctv2v.train.objectives import DiffusionObjective
from ctv2v.models.vae import load_vae_artifact

REPO = Path(__file__).resolve().parents[1]


def parameter_hash(module: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(data_dir: Path, vae_dir: Path, out_dir: Path, overrides: list[str]) -> None:
    config = load_config([REPO / "configs" / "smoke.yaml"], overrides)
    runtime = runtime_from_env(config)
    rank = runtime.dist_info.rank
    with process_group(runtime.dist_info, runtime.device):
        torch.manual_seed(config.seed)
        model = build_model(config, load_vae_artifact(vae_dir))
        model.unfreeze_vae()
        initial = parameter_hash(model)
        torch.manual_seed(config.seed + rank)
        train_set = TrainClips(load_split_volumes(data_dir, config, "train"), config.data.clip,
                               Intensity.from_config(config.data.intensity), config.seed)
        result = train_loop(TrainJob(
            name="full", config=config, objective=DiffusionObjective(model),
            param_groups=model.param_groups(config.training.full.lr, config.training.full.vae_lr_multiplier,
                                            config.training.weight_decay),
            train_set=train_set, epochs=config.training.full.epochs, batch_size=config.training.full.batch_size,
            warmup_steps=0, states={"denoiser": model.denoiser, "vae": model.vae}, out_dir=out_dir / f"rank{rank}",
            device=runtime.device, precision=runtime.precision, dist_info=runtime.dist_info,
        ))
        record = {"rank": rank, "world_size": runtime.dist_info.world_size, "steps": result.global_step,
                  "initial": initial, "final": parameter_hash(model)}
        (out_dir / f"hash-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
