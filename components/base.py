"""The KFP component decorator every pipeline step uses.

Steps are lightweight Python components: the decorated function takes typed inputs and outputs (str
parameters, Input[...] / Output[...] artifacts), and its body parses the config, calls the step's plain function
in ctv2v.steps and copies the results into its artifacts. Imports sit inside the body because KFP ships the
function's source alone. They run in the trainer image, which already holds ctv2v and kfp, so KFP must not
pip-install anything at start-up (install_kfp_package=False; this also lets kfp.local's SubprocessRunner run
them offline). The image given here is only the declared default: pipeline.dag sets each task's image from
the run's `cluster.trainer_image`.
"""

import functools

from kfp import dsl

from ctv2v.config import ClusterConfig

step_component = functools.partial(dsl.component, base_image=ClusterConfig().trainer_image,
                                   install_kfp_package=False)
"""`@step_component` turns a typed function into a KFP component."""
