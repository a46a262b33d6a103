"""Readers for the static image checks (no Docker engine here), shared by test_images and test_manifests:
Dockerfile instructions, pyproject.toml and the builds scripts/build-images.sh plans.

A plain module, not a test module, so that test modules never import each other."""

from __future__ import annotations

import json
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
BUILD_SCRIPT = REPO / "scripts" / "build-images.sh"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    """Upper-case instruction, e.g. RUN."""
    args: str
    stage: int
    """Index of the build stage (FROM) the instruction belongs to; -1 before the first FROM (global ARGs)."""


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


def declared_args(instructions: list[Instruction], stage: int) -> dict[str, str | None]:
    """The ARGs a build stage sees, with their defaults (None: no default): the stage's own declarations, where a
    bare `ARG NAME` takes over the default of a global ARG (declared before the first FROM)."""
    global_defaults = {}
    for i in instructions:
        if i.keyword == "ARG" and i.stage == -1:
            name, _, default = i.args.partition("=")
            global_defaults[name] = default if default else None
    result = {}
    for i in instructions:
        if i.keyword == "ARG" and i.stage == stage:
            name, sep, default = i.args.partition("=")
            result[name] = default if sep else global_defaults.get(name)
    return result


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@dataclass(frozen=True)
class PlannedBuild:
    """One `docker build` that scripts/build-images.sh would run."""
    tags: tuple[str, ...]
    dockerfile: Path
    build_args: dict[str, str]
    context: Path

    @property
    def repository(self) -> str:
        """The image name without tag, e.g. `registry.example.com/ml/ctv2v/trainer`."""
        [repository] = {tag.rpartition(":")[0] for tag in self.tags}
        return repository


def planned_builds(*args: str, registry: str | None = None, script: Path = BUILD_SCRIPT) -> subprocess.CompletedProcess:
    """`scripts/build-images.sh --dry-run ARGS...` (it prints the docker commands instead of running them)."""
    env = {"PATH": "/usr/bin:/bin"}
    if registry is not None:
        env["REGISTRY"] = registry
    return subprocess.run(["bash", str(script), "--dry-run", *args], capture_output=True, text=True, env=env)


def parse_build(line: str) -> PlannedBuild:
    """A `docker build --file F --build-arg K=V... --tag T... CONTEXT` line of the dry run."""
    words = shlex.split(line)
    assert words[:2] == ["docker", "build"], line
    options, context = words[2:-1], words[-1]
    assert len(options) % 2 == 0, f"expected `--option value` pairs: {line}"
    pairs = list(zip(options[::2], options[1::2]))
    assert {flag for flag, _ in pairs} <= {"--file", "--build-arg", "--tag"}, line
    [dockerfile] = [value for flag, value in pairs if flag == "--file"]
    tags = tuple(value for flag, value in pairs if flag == "--tag")
    build_args = dict(value.split("=", 1) for flag, value in pairs if flag == "--build-arg")
    return PlannedBuild(tags, Path(dockerfile), build_args, Path(context))


def default_builds() -> dict[str, PlannedBuild]:
    """What `scripts/build-images.sh` builds with no arguments, by image name without registry or tag
    (e.g. `ctv2v/trainer`)."""
    result = planned_builds()
    assert result.returncode == 0, result.stderr
    builds = [parse_build(line) for line in result.stdout.splitlines()]
    return {build.repository: build for build in builds}
