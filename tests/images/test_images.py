"""Static checks of the container images (no Docker engine here): Dockerfile rules, hadolint, pinned versions,
the build context (.dockerignore), the step images' kinds (cpu, trainer) and the trainer's sm_70 build guard,
and scripts/build-images.sh."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from ctv2v.config import ClusterConfig
from tests.static_checks import (
    BUILD_SCRIPT,
    IMAGES,
    REPO,
    Instruction,
    declared_args,
    default_builds,
    dockerfile_instructions,
    exec_form,
    final_stage,
    healthcheck_command,
    parse_build,
    planned_builds,
    pyproject,
)

BIN = Path(sys.executable).parent
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
STEP_DOCKERFILE = IMAGES / "ctv2v" / "Dockerfile"
"""The one Dockerfile of the images whose entrypoint is the `ctv2v` CLI (the pipeline's step command lines)."""
STEP_IMAGE_KINDS = ("trainer", "cpu")
TORCH_INDEX_BY_KIND = {"trainer": "https://download.pytorch.org/whl/cu126",
                       "cpu": "https://download.pytorch.org/whl/cpu"}


def copy_sources(instruction: Instruction) -> list[str]:
    """Build-context paths of a COPY (none for COPY --from=stage)."""
    words = shlex.split(instruction.args)
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def run_as_docker_would(instruction: Instruction, args: dict[str, str | None], tmp_path: Path, shim_exit: int = 0,
                        shimmed: tuple[str, ...] = ("pip", "python"),
                        ) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run a RUN instruction's shell-form command the way `docker build` does (`/bin/sh -c`, the stage's ARGs and
    ENVs in the environment), with the `shimmed` commands replaced by recorders that exit with `shim_exit`: returns
    the result and their argv lists."""
    assert not instruction.args.startswith("["), f"exec-form RUN: {instruction.args}"
    shims, calls = tmp_path / "shims", tmp_path / "calls.jsonl"
    shims.mkdir(exist_ok=True)
    calls.write_text("")
    for name in shimmed:
        shim = shims / name
        shim.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        f"with open(os.environ['SHIM_CALLS'], 'a') as f:\n"
                        f"    f.write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n"
                        f"sys.exit({shim_exit})\n")
        shim.chmod(0o755)
    env = {name: value for name, value in args.items() if value is not None}
    env |= {"PATH": f"{shims}:/usr/bin:/bin", "SHIM_CALLS": str(calls)}
    result = subprocess.run(["/bin/sh", "-c", instruction.args], capture_output=True, text=True, env=env)
    return result, [json.loads(line) for line in calls.read_text().splitlines()]


def stage_env(instructions: list[Instruction]) -> dict[str, str]:
    """The `ENV NAME=VALUE ...` settings of these instructions, later ones winning (values without $-expansion)."""
    env = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(instruction.args))
    return env


def builder_stage_args(kind: str | None) -> dict[str, str | None]:
    """The ARGs the builder stage (the first) of the step Dockerfile sees for `--build-arg IMAGE_KIND=kind`."""
    instructions = dockerfile_instructions(STEP_DOCKERFILE)
    args = declared_args(instructions, stage=0)
    assert "IMAGE_KIND" in args, "the builder stage must declare ARG IMAGE_KIND to see it"
    return args | {"IMAGE_KIND": kind}


def step_runs(predicate) -> list[Instruction]:
    """The step Dockerfile's RUN instructions whose command matches `predicate`."""
    return [i for i in dockerfile_instructions(STEP_DOCKERFILE) if i.keyword == "RUN" and predicate(i.args)]


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


# ------------------------------------------------------------------------------------------ Dockerfile rules
def test_each_image_is_built_from_its_dockerfile_and_every_dockerfile_is_built():
    builds = default_builds()
    assert {name: (b.dockerfile, b.build_args.get("IMAGE_KIND")) for name, b in builds.items()} == {
        "ctv2v/trainer": (STEP_DOCKERFILE, "trainer"),
        "ctv2v/cpu": (STEP_DOCKERFILE, "cpu"),
        "ctv2v/mlflow-server": (IMAGES / "mlflow-server" / "Dockerfile", None),
    }
    assert {b.dockerfile for b in builds.values()} == set(DOCKERFILES), "a Dockerfile nothing builds"


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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_home_and_its_cache_are_writable_by_any_uid(dockerfile, tmp_path):
    """A cluster may run the image under another UID than its USER (runAsUser, OpenShift): Python, Hugging Face,
    torch and ctv2v write under $HOME/.cache, which must then still be writable."""
    shipped = final_stage(dockerfile_instructions(dockerfile))
    home = stage_env(shipped)["HOME"]
    [create_user] = [i for i in shipped if i.keyword == "RUN" and "useradd" in i.args]
    # Before the user is created: HOME must already be set by ENV (the RUN uses it).
    assert shipped.index(create_user) > min(n for n, i in enumerate(shipped) if i.keyword == "ENV" and "HOME=" in i.args)
    local_home = tmp_path / home.lstrip("/")
    result, calls = run_as_docker_would(create_user, {"HOME": str(local_home)}, tmp_path,
                                        shimmed=("groupadd", "useradd"))
    assert result.returncode == 0, result.stderr
    [useradd] = [c for c in calls if c[0] == "useradd"]
    assert useradd[useradd.index("--home-dir") + 1] == str(local_home)
    for folder in (local_home, local_home / ".cache"):
        mode = folder.stat().st_mode
        assert stat.S_IMODE(mode) == 0o1777, f"{folder}: {oct(stat.S_IMODE(mode))}, expected sticky and world-writable"


def test_step_images_run_the_cli_and_have_no_healthcheck():
    shipped = final_stage(dockerfile_instructions(STEP_DOCKERFILE))
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


def test_image_kind_must_be_chosen_at_build_time():
    instructions = dockerfile_instructions(STEP_DOCKERFILE)
    assert declared_args(instructions, stage=-1) == {"IMAGE_KIND": None}, "IMAGE_KIND: a global ARG, no default"


@pytest.mark.parametrize("kind", [None, "", "gpu"])
def test_a_build_without_a_known_image_kind_fails_before_installing(kind, tmp_path):
    [install] = step_runs(lambda run: "torch==" in run)
    result, calls = run_as_docker_would(install, builder_stage_args(kind), tmp_path)
    assert result.returncode != 0 and "IMAGE_KIND must be cpu or trainer" in result.stderr
    assert calls == []


@pytest.mark.parametrize("kind", STEP_IMAGE_KINDS)
def test_torch_comes_from_the_kinds_index_at_the_constrained_version(kind, tmp_path):
    args = builder_stage_args(kind)
    assert args["TORCH_VERSION"] == pins(IMAGES / "constraints.txt")["torch"]
    torch_spec = next(Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    assert torch_spec.specifier.contains(args["TORCH_VERSION"])
    # torch is installed alone, before the package: from the package's install, pip would take PyPI's build.
    runs = step_runs(lambda run: "pip install" in run)
    assert "torch==" in runs[0].args and all("torch==" not in r.args for r in runs[1:])
    result, calls = run_as_docker_would(runs[0], args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls == [["pip", "install", "--index-url", TORCH_INDEX_BY_KIND[kind], f"torch=={args['TORCH_VERSION']}"]]


@pytest.mark.parametrize("kind", STEP_IMAGE_KINDS)
def test_only_the_trainer_build_checks_for_cuda_126_and_sm70_after_every_install(kind, tmp_path):
    instructions = dockerfile_instructions(STEP_DOCKERFILE)
    runs = [i for i in instructions if i.keyword == "RUN"]
    [check] = [n for n, i in enumerate(runs) if "check_torch_cuda.py" in i.args]
    # After every pip install of the stage whose environment ships, so a later install cannot swap torch.
    installs = [n for n, i in enumerate(runs) if i.stage == runs[check].stage and "pip install" in i.args]
    assert installs and max(installs) < check
    shipped_from = [i.args for i in final_stage(instructions) if i.keyword == "COPY" and "--from=" in i.args]
    assert any("/opt/venv" in c for c in shipped_from)
    assert any(i.keyword == "COPY" and i.args == "images/ctv2v/check_torch_cuda.py /tmp/check_torch_cuda.py"
               for i in instructions)
    result, calls = run_as_docker_would(runs[check], builder_stage_args(kind), tmp_path)
    assert result.returncode == 0, result.stderr
    expected = {"trainer": [["python", "/tmp/check_torch_cuda.py", "--cuda", "12.6", "--arch", "sm_70"]], "cpu": []}
    assert calls == expected[kind]
    if kind == "trainer":
        refused, _ = run_as_docker_would(runs[check], builder_stage_args(kind), tmp_path, shim_exit=1)
        assert refused.returncode != 0, "a failing guard must fail the build"


def _load_check_module():
    spec = importlib.util.spec_from_file_location("check_torch_cuda", IMAGES / "ctv2v" / "check_torch_cuda.py")
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
    result = subprocess.run([sys.executable, str(IMAGES / "ctv2v" / "check_torch_cuda.py"),
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


@pytest.mark.parametrize("path", [".venv/bin/python", ".git/HEAD", "workspace/cache/a.npy", "tests/images/test_images.py",
                                  ".pytest_cache/v/x", "ctv2v/__pycache__/config.cpython-311.pyc",
                                  "ctv2v.egg-info/PKG-INFO", "manifests/base/mlflow.yaml", "benchmarks/x.py"])
def test_dockerignore_keeps_local_state_out_of_the_build_context(path):
    assert dockerignore_excludes(_dockerignore_patterns(), path)


# ------------------------------------------------------------------------------------------ build script
def test_build_script_passes_shellcheck():
    result = subprocess.run([str(BIN / "shellcheck"), str(BUILD_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_script_tags_every_image_with_the_package_version_and_the_commit():
    version = pyproject()["project"]["version"]
    builds = default_builds()
    assert all(b.context == REPO for b in builds.values()), "the build context must be the repository root"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for name, build in builds.items():
        commit = build.build_args["CTV2V_GIT_COMMIT"]
        assert commit in (head, f"{head}-dirty")
        dirty = "-dirty" if commit.endswith("-dirty") else ""
        assert build.tags == (f"{name}:{version}", f"{name}:git-{head[:12]}{dirty}")
    # The pipeline's default step image is what the script builds.
    assert ClusterConfig().trainer_image in {tag for b in builds.values() for tag in b.tags}


def test_every_build_arg_the_script_passes_is_declared_where_it_is_used():
    """docker build only warns about a build arg no ARG declares: a misspelt one would silently do nothing."""
    for name, build in default_builds().items():
        instructions = dockerfile_instructions(build.dockerfile)
        declared = {n for stage in range(-1, max(i.stage for i in instructions) + 1)
                    for n in declared_args(instructions, stage)}
        assert set(build.build_args) <= declared, f"{name}: {set(build.build_args) - declared} not declared"
    shipped = final_stage(dockerfile_instructions(STEP_DOCKERFILE))
    assert "CTV2V_GIT_COMMIT" in declared_args(shipped, shipped[0].stage)


def test_the_readme_names_only_images_the_script_builds_at_the_package_version():
    version = pyproject()["project"]["version"]
    builds = default_builds()
    used = re.findall(r"(?<![\w.-])ctv2v/([\w-]+):([0-9][\w.]*)", (REPO / "README.md").read_text())
    assert {"cpu", "trainer"} <= {name for name, _ in used}, "the README's docker reruns use both step images"
    for name, tag in used:
        assert f"ctv2v/{name}" in builds and tag == version, f"README: ctv2v/{name}:{tag} is not built"


def git_repository_with_the_build_script(root: Path) -> Path:
    """A committed git repository holding what scripts/build-images.sh reads (itself and pyproject.toml)."""
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(BUILD_SCRIPT, root / "scripts" / BUILD_SCRIPT.name)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    git = ["git", "-C", str(root), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "--quiet"], ["add", "."], ["commit", "--quiet", "-m", "build script"]):
        subprocess.run(git + command, check=True, capture_output=True)
    return root / "scripts" / BUILD_SCRIPT.name


FAKE_DOCKER = f"""#!{sys.executable}
# Stands in for the Docker engine (none here): records each call; `image inspect` answers with a digest derived
# from the tag, as a registry would after `docker push`.
import hashlib, json, os, sys
with open(os.environ["DOCKER_CALLS"], "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["image", "inspect"]:
    tag = sys.argv[-1]
    print("other.example/mirror@sha256:" + "0" * 64)
    print(tag.rpartition(":")[0] + "@sha256:" + hashlib.sha256(tag.encode()).hexdigest())
"""


def run_build_script(script: Path, *args: str, tmp_path: Path, docker: str = FAKE_DOCKER,
                     ) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """scripts/build-images.sh ARGS with a fake docker (source `docker`) first on PATH: the result and the docker
    calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "docker-calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(docker)
    (bin_dir / "docker").chmod(0o755)
    calls.write_text("")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "DOCKER_CALLS": str(calls), "REGISTRY": "registry.example.com/ml"}
    result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env)
    return result, [json.loads(line) for line in calls.read_text().splitlines()]


def test_build_script_prefixes_the_registry_and_pushes_both_tags_on_request(tmp_path):
    script = git_repository_with_the_build_script(tmp_path / "repo")
    result = planned_builds("--push", "trainer", registry="registry.example.com/ml/", script=script)
    assert result.returncode == 0, result.stderr
    version = pyproject()["project"]["version"]
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    tags = parse_build(lines[0]).tags
    assert tags[0] == f"registry.example.com/ml/ctv2v/trainer:{version}"
    assert [shlex.split(line) for line in lines[1:]] == [["docker", "push", tag] for tag in tags]


def test_push_writes_a_lock_file_with_each_images_commit_tag_and_digest(tmp_path):
    script = git_repository_with_the_build_script(tmp_path / "repo")
    lock = tmp_path / "out" / "images.lock.json"
    result, calls = run_build_script(script, "--push", "--lock", str(lock), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    head = subprocess.run(["git", "-C", str(script.parents[1]), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    locked = json.loads(lock.read_text())
    assert locked["commit"] == head and locked["version"] == pyproject()["project"]["version"]
    assert set(locked["images"]) == {"trainer", "cpu", "mlflow-server"}
    for image, entry in locked["images"].items():
        repository = f"registry.example.com/ml/ctv2v/{image}"
        assert entry["tag"] == f"{repository}:git-{head[:12]}"
        # The digest of this repository (not another RepoDigests entry), of the pushed commit tag.
        assert entry["ref"] == f"{repository}@sha256:{hashlib.sha256(entry['tag'].encode()).hexdigest()}"
        assert ["push", entry["tag"]] in calls
    assert not list(lock.parent.glob("*.tmp")), "the lock file is written atomically"


def test_push_refuses_a_dirty_work_tree_unless_allowed(tmp_path):
    script = git_repository_with_the_build_script(tmp_path / "repo")
    (script.parents[1] / "uncommitted.txt").write_text("change")
    lock = tmp_path / "images.lock.json"
    refused, calls = run_build_script(script, "--push", "--lock", str(lock), tmp_path=tmp_path)
    assert refused.returncode == 1 and "uncommitted changes" in refused.stderr
    assert calls == [] and not lock.exists()
    allowed, calls = run_build_script(script, "--push", "--allow-dirty", "--lock", str(lock), "cpu", tmp_path=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    commit = json.loads(lock.read_text())["commit"]
    assert commit.endswith("-dirty") and json.loads(lock.read_text())["images"]["cpu"]["tag"].endswith("-dirty")


def test_a_failed_push_writes_no_lock_file(tmp_path):
    script = git_repository_with_the_build_script(tmp_path / "repo")
    lock = tmp_path / "images.lock.json"
    failing = FAKE_DOCKER + "if sys.argv[1] == 'push':\n    sys.exit(1)\n"
    result, calls = run_build_script(script, "--push", "--lock", str(lock), tmp_path=tmp_path, docker=failing)
    assert result.returncode != 0 and calls[-1][0] == "push"
    assert not lock.exists()
