"""The KFP component decorator every pipeline step uses.

Steps are lightweight Python components: the decorated function takes typed inputs and outputs (str/int/bool
parameters, Input[...] / Output[...] artifacts) and its body only imports and calls the step's plain function
with artifact paths; imports sit inside the body because KFP ships the function's source alone. They run in
the trainer image, which already holds ctv2v and kfp, so KFP must not pip-install anything at start-up
(install_kfp_package=False; this also lets kfp.local's SubprocessRunner run them offline).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

from kfp import dsl

from ctv2v.config import ClusterConfig

TRAINER_IMAGE = ClusterConfig().trainer_image
"""The image a component is declared with; pipeline.dag.build_pipeline sets the run's `cluster.trainer_image`."""

if os.environ.get("_KFP_RUNTIME") == "true":
    # Inside a running component kfp.dsl omits its authoring API (no dsl.component); a step module imported by
    # an op body only needs its plain function there, so the decorator leaves functions as they are.
    def step_component(func):
        return func
else:
    step_component = functools.partial(dsl.component, base_image=TRAINER_IMAGE, install_kfp_package=False)
"""`@step_component` turns a typed function into a KFP component that runs in TRAINER_IMAGE."""


def run_distributed(nproc: int, cli_args: list[str]) -> None:
    """Run `ctv2v <cli_args>` under `torchrun --nproc_per_node nproc` (one process per GPU, DDP); raise on failure."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipeline.cli", *cli_args]
    subprocess.run(command, check=True)
