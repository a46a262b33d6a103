"""DDP: two real CPU processes (gloo) launched by torch.distributed.run train in lockstep; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from ctv2v.train.loop import ShardSampler
from tests.conftest import REPO, TRAINING_OVERRIDES, TRAINING_PHANTOM, prepared_phantoms, training_config


def test_two_gloo_ranks_keep_identical_weights_and_only_rank0_checkpoints(tmp_path):
    from ctv2v.models.vae import ScratchVAE, save_vae_artifact

    ddp_overrides = ["training.full.batch_size=1", "training.full.epochs=1"]
    config = training_config(*ddp_overrides)
    data = prepared_phantoms(tmp_path / "data", config, volumes=4, shape=TRAINING_PHANTOM)
    torch.manual_seed(0)
    save_vae_artifact(ScratchVAE.from_config(config.vae.scratch), tmp_path / "vae", weights="scratch",
                      extra={"note": "random weights, test input"})
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_train_script.py"), str(data), str(tmp_path / "vae"), str(out),
           *TRAINING_OVERRIDES, *ddp_overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [json.loads((out / f"hash-rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 4 training clips over 2 ranks at batch size 1: 2 steps, each averaging the gradients of 2 clips.
    assert [r["steps"] for r in ranks] == [2, 2]
    assert ranks[0]["initial"] == ranks[1]["initial"]
    assert ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["final"] != ranks[0]["initial"]
    assert sorted(p.name for p in (out / "rank0" / "checkpoints").iterdir()) == ["step-00000002.pt"]
    assert not (out / "rank1").exists()
    checkpoint = torch.load(out / "rank0" / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2


def test_shards_partition_each_epoch_and_resume_mid_epoch():
    samplers = [ShardSampler(7, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    for epoch in (0, 1):
        shards = []
        for sampler in samplers:
            sampler.set_position(epoch, 0)
            shards.append(list(sampler))
        assert len(shards[0]) == len(shards[1]) == 4  # padded by repeating, as DistributedSampler does
        assert set(shards[0]) | set(shards[1]) == set(range(7))
        samplers[0].set_position(epoch, 2)
        assert list(samplers[0]) == shards[0][2:]
    samplers[0].set_position(0, 0)
    first = list(samplers[0])
    samplers[0].set_position(1, 0)
    assert list(samplers[0]) != first
