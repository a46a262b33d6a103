"""Static checks of the container images (no Docker engine here): Dockerfile rules, hadolint, pinned versions,
the build context (.dockerignore), the trainer's sm_70 build guard and scripts/build-images.sh."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ctv2v.config import ClusterConfig

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
BIN = Path(sys.executable).parent
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
CTV2V_IMAGES = ("trainer", "cpu")
"""Images whose entrypoint is the `ctv2v` CLI (the pipeline's step command lines)."""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    """Upper-case instruction, e.g. RUN."""
    args: str
    stage: int
    """Index of the build stage (FROM) the instruction belongs to."""


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, " ".join(args.split()), stage))
    if pending:
        raise ValueError(f"{path}: ends inside a continued line: {pending!r}")
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """Instructions of the last build stage: what the image ships."""
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON (exec-form) argument list of ENTRYPOINT/CMD; shell form is refused (signals, PID 1)."""
    try:
        value = json.loads(instruction.args)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{instruction.keyword} is not in exec form: {instruction.args}") from exc
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instruction
    return value


def healthcheck_command(instruction: Instruction) -> list[str]:
    """The exec-form command of `HEALTHCHECK [OPTIONS] CMD [...]`."""
    _, sep, command = instruction.args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {instruction.args}"
    return json.loads(command)


def default_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults of a Dockerfile (`ARG NAME=VALUE`)."""
    return dict(i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args)


def copy_sources(instruction: Instruction) -> list[str]:
    """Build-context paths of a COPY (none for COPY --from=stage)."""
    words = shlex.split(instruction.args)
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a requirements/constraints file, by canonical name."""
    result = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{path}: not an exact pin: {line}"
        result[canonical(requirement.name)] = specifiers[0].version
    return result


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ------------------------------------------------------------------------------------------ Dockerfile rules
def test_the_three_images_exist():
    assert {p.parent.name for p in DOCKERFILES} == {"trainer", "cpu", "mlflow-server"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_finds_nothing(dockerfile):
    result = subprocess.run([str(BIN / "hadolint"), "--failure-threshold", "style", str(dockerfile)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned_and_stages_resolve(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    stages: set[str] = set()
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            image = next(w for w in words if not w.startswith("--"))
            assert "$" not in image, f"{dockerfile}: FROM through a build ARG cannot be checked: {image}"
            if image not in stages:
                name, _, tag = image.rpartition(":")
                assert name and "/" not in tag, f"{dockerfile}: FROM {image} has no tag"
                assert tag != "latest", f"{dockerfile}: FROM {image} uses latest"
                assert re.search(r"\d+\.\d+\.\d+", tag), f"{dockerfile}: FROM {image}: pin a full version"
            if len(words) >= 3 and words[-2].upper() == "AS":
                stages.add(words[-1])
        if instruction.keyword == "COPY":
            for word in shlex.split(instruction.args):
                if word.startswith("--from="):
                    assert word.split("=", 1)[1] in stages, f"{dockerfile}: {instruction.args}: unknown stage"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_final_stage_runs_as_numeric_non_root_user(dockerfile):
    users = [i.args for i in final_stage(dockerfile_instructions(dockerfile)) if i.keyword == "USER"]
    assert users, f"{dockerfile}: final stage has no USER (would run as root)"
    uid, _, gid = users[-1].partition(":")
    # Numeric: Kubernetes' runAsNonRoot can verify only a numeric user.
    assert uid.isdigit() and int(uid) != 0, f"{dockerfile}: USER {users[-1]}"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"{dockerfile}: USER {users[-1]}"


@pytest.mark.parametrize("name", CTV2V_IMAGES)
def test_ctv2v_images_run_the_cli_and_have_no_healthcheck(name):
    shipped = final_stage(dockerfile_instructions(IMAGES / name / "Dockerfile"))
    [entrypoint] = [i for i in shipped if i.keyword == "ENTRYPOINT"]
    assert exec_form(entrypoint) == ["ctv2v"]
    [healthcheck] = [i for i in shipped if i.keyword == "HEALTHCHECK"]
    assert healthcheck.args == "NONE"
    # The commit reaches the runtime environment, where MLflow's run records read it.
    assert any(i.keyword == "ENV" and i.args == "CTV2V_GIT_COMMIT=${CTV2V_GIT_COMMIT}" for i in shipped)
    # The image builds only if the installed CLI starts.
    assert any(i.keyword == "RUN" and i.args.startswith("ctv2v --help") for i in shipped)


def test_mlflow_image_serves_and_healthchecks_a_real_api_endpoint():
    shipped = final_stage(dockerfile_instructions(IMAGES / "mlflow-server" / "Dockerfile"))
    [entrypoint] = [i for i in shipped if i.keyword == "ENTRYPOINT"]
    assert exec_form(entrypoint) == ["mlflow", "server"]
    [healthcheck] = [i for i in shipped if i.keyword == "HEALTHCHECK"]
    command = " ".join(healthcheck_command(healthcheck))
    assert "/api/2.0/mlflow/" in command and "/health'" not in command


@pytest.mark.parametrize("name, index", [("trainer", "https://download.pytorch.org/whl/cu126"),
                                         ("cpu", "https://download.pytorch.org/whl/cpu")])
def test_torch_comes_from_the_right_index_at_the_constrained_version(name, index):
    instructions = dockerfile_instructions(IMAGES / name / "Dockerfile")
    args = default_args(instructions)
    assert args["TORCH_INDEX_URL"] == index
    assert args["TORCH_VERSION"] == pins(IMAGES / "constraints.txt")["torch"]
    torch_spec = next(Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    assert torch_spec.specifier.contains(args["TORCH_VERSION"])
    runs = [i.args for i in instructions if i.keyword == "RUN"]
    assert any('--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in r for r in runs)


def test_trainer_build_fails_without_sm70_kernels():
    instructions = dockerfile_instructions(IMAGES / "trainer" / "Dockerfile")
    runs = [i for i in instructions if i.keyword == "RUN"]
    check = [n for n, i in enumerate(runs) if "check_torch_cuda.py" in i.args]
    assert len(check) == 1, "the trainer image must run images/trainer/check_torch_cuda.py once"
    words = shlex.split(runs[check[0]].args)
    assert words[words.index("--arch") + 1] == "sm_70" and words[words.index("--cuda") + 1] == "12.6"
    # After every pip install of the stage whose environment ships, so a later install cannot swap torch.
    check_stage = runs[check[0]].stage
    installs = [n for n, i in enumerate(runs) if i.stage == check_stage and "pip install" in i.args]
    assert installs and max(installs) < check[0]
    shipped_from = [i.args for i in final_stage(instructions) if i.keyword == "COPY" and "--from=" in i.args]
    assert any("/opt/venv" in c for c in shipped_from)


def _load_check_module():
    spec = importlib.util.spec_from_file_location("check_torch_cuda", IMAGES / "trainer" / "check_torch_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_guard_accepts_only_a_cuda_126_build_with_sm70():
    problems = _load_check_module().build_problems
    volta = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
    assert problems("2.13.0+cu126", "12.6", volta, "12.6", "sm_70") == []
    cu128 = problems("2.13.0+cu128", "12.8", ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], "12.6", "sm_70")
    assert len(cu128) == 2 and "CUDA 12.8" in cu128[0] and "no sm_70 kernels" in cu128[1]
    assert "CPU-only" in problems("2.13.0+cpu", None, [], "12.6", "sm_70")[0]
    assert problems("2.13.0+cu126", "12.60", volta, "12.6", "sm_70"), "12.60 is not the 12.6 line"


def test_build_guard_fails_on_this_machines_cpu_torch():
    result = subprocess.run([sys.executable, str(IMAGES / "trainer" / "check_torch_cuda.py"),
                             "--cuda", "12.6", "--arch", "sm_70"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "CPU-only build" in result.stderr


# --------------------------------------------------------------------------------------------- versions
def test_constraints_pin_every_runtime_and_server_dependency_within_pyproject_ranges():
    constraints = pins(IMAGES / "constraints.txt")
    project = pyproject()["project"]
    for line in project["dependencies"] + project["optional-dependencies"]["server"]:
        requirement = Requirement(line)
        name = canonical(requirement.name)
        assert name in constraints, f"images/constraints.txt does not pin {name}"
        assert requirement.specifier.contains(constraints[name], prereleases=True), (
            f"images/constraints.txt pins {name}=={constraints[name]}, outside pyproject's {requirement}")
    assert "ctv2v" not in constraints


def test_mlflow_server_requirements_are_pinned_and_agree_with_constraints():
    constraints = pins(IMAGES / "constraints.txt")
    server = pins(IMAGES / "mlflow-server" / "requirements.txt")
    assert {"mlflow", "boto3", "psycopg2-binary"} <= set(server)
    for name, version in server.items():
        if name in constraints:
            assert constraints[name] == version, f"{name}: requirements {version} vs constraints {constraints[name]}"
    extra = {canonical(Requirement(r).name): Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["server"]}
    for name, requirement in extra.items():
        assert requirement.specifier.contains(server[name]), f"{name}=={server[name]} outside {requirement}"


# ------------------------------------------------------------------------------------------ build context
def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context (last matching pattern wins; `!` re-includes;
    a pattern that matches a parent directory matches everything below it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _dockerignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_dockerignore_matcher_follows_docker_semantics():
    patterns = ["*", "!src/", "**/__pycache__", "!keep.txt"]
    assert dockerignore_excludes(patterns, "secret.env")
    assert not dockerignore_excludes(patterns, "src/a/b.py")
    assert dockerignore_excludes(patterns, "src/a/__pycache__/b.pyc")
    assert not dockerignore_excludes(patterns, "keep.txt")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    patterns = _dockerignore_patterns()
    sources = [s for i in dockerfile_instructions(dockerfile) if i.keyword == "COPY" for s in copy_sources(i)]
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"{dockerfile}: COPY {source}: no such path in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, f"{dockerfile}: COPY {source} copies nothing"
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            assert not dockerignore_excludes(patterns, relative), f".dockerignore drops {relative} ({dockerfile})"


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/HEAD", "workspace/cache/a.npy", "tests/test_images.py",
                                  ".pytest_cache/v/x", "ctv2v/__pycache__/config.cpython-311.pyc",
                                  "ctv2v.egg-info/PKG-INFO", "manifests/base/mlflow.yaml", "benchmarks/x.py"])
def test_dockerignore_keeps_local_state_out_of_the_build_context(path):
    assert dockerignore_excludes(_dockerignore_patterns(), path)


# ------------------------------------------------------------------------------------------ build script
BUILD_SCRIPT = REPO / "scripts" / "build-images.sh"


def _build_script(*args: str, registry: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if registry is not None:
        env["REGISTRY"] = registry
    return subprocess.run(["bash", str(BUILD_SCRIPT), *args], capture_output=True, text=True, env=env)


def test_build_script_passes_shellcheck():
    result = subprocess.run([str(BIN / "shellcheck"), str(BUILD_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_script_tags_every_image_with_the_package_version():
    result = _build_script("--dry-run")
    assert result.returncode == 0, result.stderr
    version = pyproject()["project"]["version"]
    builds = [shlex.split(line) for line in result.stdout.splitlines()]
    assert all(words[:2] == ["docker", "build"] for words in builds)
    tags = {words[words.index("--tag") + 1]: words[words.index("--file") + 1] for words in builds}
    assert tags == {f"ctv2v/{p.parent.name}:{version}": str(p) for p in DOCKERFILES}
    assert all(words[-1] == str(REPO) for words in builds), "the build context must be the repository root"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for words in builds:
        commit = words[words.index("--build-arg") + 1]
        assert commit in (f"CTV2V_GIT_COMMIT={head}", f"CTV2V_GIT_COMMIT={head}-dirty")
    # The pipeline's default step image is what the script builds.
    assert ClusterConfig().trainer_image in tags


def test_build_script_prefixes_the_registry_and_pushes_on_request():
    result = _build_script("--dry-run", "--push", "trainer", registry="registry.example.com/ml/")
    assert result.returncode == 0, result.stderr
    version = pyproject()["project"]["version"]
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("docker build") and f"registry.example.com/ml/ctv2v/trainer:{version}" in lines[0]
    assert shlex.split(lines[1]) == ["docker", "push", f"registry.example.com/ml/ctv2v/trainer:{version}"]


def test_build_script_rejects_an_unknown_image_before_building():
    result = _build_script("--dry-run", "trainer", "gpu")
    assert result.returncode == 2
    assert "no such image: gpu" in result.stderr and result.stdout == ""
