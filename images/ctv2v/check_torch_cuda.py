"""Image build guard: fail unless the installed torch is a CUDA build of the wanted line with kernels for the GPU.

V100 is compute capability 7.0 (sm_70). PyTorch's CUDA 12.8 and 13.x builds no longer compile sm_70 kernels, so
an image built from the wrong index imports fine and then fails on the node with "no kernel image is available
for execution on the device". `torch.cuda.get_arch_list()` reads the compiled arch list and needs no GPU, so
the build itself can refuse such an image.

Usage: python check_torch_cuda.py --cuda 12.6 --arch sm_70
"""

from __future__ import annotations

import argparse
import sys


def build_problems(torch_version: str, cuda_version: str | None, arch_list: list[str],
                   required_cuda: str, required_arch: str) -> list[str]:
    """What is wrong with a torch build for the wanted CUDA line and GPU arch (empty when it fits)."""
    if cuda_version is None:
        return [f"torch {torch_version} is a CPU-only build; install the CUDA {required_cuda} build "
                f"(https://download.pytorch.org/whl/cu{required_cuda.replace('.', '')})"]
    problems = []
    if cuda_version != required_cuda and not cuda_version.startswith(required_cuda + "."):
        problems.append(f"torch {torch_version} is built for CUDA {cuda_version}, expected CUDA {required_cuda}")
    if required_arch not in arch_list:
        problems.append(f"torch {torch_version} (CUDA {cuda_version}) has no {required_arch} kernels; "
                        f"compiled for {' '.join(arch_list) or 'no architectures'}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", required=True, help="CUDA line torch must be built for, e.g. 12.6")
    parser.add_argument("--arch", required=True, help="GPU architecture torch must have kernels for, e.g. sm_70")
    args = parser.parse_args(argv)

    import torch

    problems = build_problems(torch.__version__, torch.version.cuda, torch.cuda.get_arch_list(),
                              args.cuda, args.arch)
    for problem in problems:
        print(f"check_torch_cuda: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_torch_cuda: torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"archs {' '.join(torch.cuda.get_arch_list())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
