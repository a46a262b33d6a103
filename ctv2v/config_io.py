"""Reading and writing run configurations: YAML files layered in order, `--set a.b=c` overrides, key hints.

Every section forbids unknown keys. Before pydantic sees the data, the raw mapping is walked against the
schema so that a typo or a key at the wrong depth is reported with its full dotted path and the nearest
valid key (a sibling with a similar name, or the same name where it belongs elsewhere in the tree).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ctv2v.config import ConfigError, RunConfig
from ctv2v.files import atomic_write_text


# ------------------------------------------------------------------------------------ key validation
def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, if any (unwrapping Optional/Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin is Annotated or origin is not None:
        for arg in get_args(annotation):
            found = _section_of(arg)
            if found is not None:
                return found
    return None


def _all_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        sub = _section_of(field.annotation)
        if sub is not None:
            paths.extend(_all_paths(sub, path + "."))
    return paths


def _check_keys(raw: Any, model: type[BaseModel], prefix: str, errors: list[str]) -> None:
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in model.model_fields:
            errors.append(f"unknown key '{path}'{_suggest(str(key), model, prefix)}")
            continue
        sub = _section_of(model.model_fields[key].annotation)
        if sub is not None:
            if not isinstance(value, dict):
                errors.append(f"'{path}' is a section and needs a mapping, got {type(value).__name__}")
            else:
                _check_keys(value, sub, path + ".", errors)


def _suggest(key: str, model: type[BaseModel], prefix: str) -> str:
    elsewhere = [p for p in _all_paths(RunConfig) if p.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return "; did you mean " + " or ".join(f"'{p}'" for p in elsewhere) + "? (the key belongs there)"
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; valid keys here: {', '.join(model.model_fields)}"


# ------------------------------------------------------------------------------------ loading, merging
YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
"""YAML 1.2 floats without a dot (`1e-4`), which PyYAML (YAML 1.1) would otherwise read as the string '1e-4'."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML12_FLOAT."""


class _ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, plus YAML12_FLOAT: a string such as '1e5' is written quoted, so it loads back a string."""


for _yaml_class in (_ConfigLoader, _ConfigDumper):
    _yaml_class.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+0123456789"))


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice; YAML readers would silently keep the last value."""


def _duplicate_keys(node: yaml.Node, prefix: str = "") -> list[str]:
    """Every key given twice in the same mapping below `node`, with its dotted path and both line numbers."""
    problems = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in first_line:
                problems.append(f"duplicate key '{prefix}{key}' at lines {first_line[key]} and {line}")
            else:
                first_line[key] = line
            problems += _duplicate_keys(value_node, f"{prefix}{key}.")
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(item, f"{prefix}{index}.")
    return problems


def _load_yaml(text: str) -> Any:
    """The YAML document in `text`; DuplicateKeyError if a mapping repeats a key (the last would silently win)."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicates = _duplicate_keys(node)
        if duplicates:
            raise DuplicateKeyError("; ".join(duplicates))
        return loader.construct_document(node)
    finally:
        loader.dispose()


def deep_merge(base: dict, overlay: dict) -> dict:
    """`overlay` on top of `base`: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {'a': {'b': {'c': value}}}, the value parsed as YAML (numbers, lists, null...).

    An empty value is refused (it would be an empty string, e.g. a data.source naming the current folder).
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. training.frozen.epochs=2")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty component in key {key!r}")
    if not value.strip():
        raise ConfigError(f"--set {text!r}: empty value for {key.strip()!r}; give a value")
    try:
        parsed: Any = _load_yaml(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from exc
    for part in reversed(parts):
        parsed = {part: parsed}
    return parsed


def validate(raw: dict, origin: str) -> RunConfig:
    """Validate a raw mapping; `origin` (files and overrides) is named in every error."""
    errors: list[str] = []
    _check_keys(raw, RunConfig, "", errors)
    if errors:
        raise ConfigError(f"{origin}: " + "; ".join(errors))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            got = f" (got {err['input']!r})" if err["type"].endswith(("_type", "_parsing", "finite_number")) else ""
            problems.append(f"'{loc}': {err['msg']}{got}" if loc else err["msg"])
        raise ConfigError(f"{origin}: " + "; ".join(problems)) from None


def load_config(paths: list[str | Path] | str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read YAML files in order (later files overlay earlier ones), apply `--set` overrides, validate."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict = {}
    for path in paths:
        raw = deep_merge(raw, _read_yaml(Path(path)))
    for text in overrides:
        raw = deep_merge(raw, parse_override(text))
    origin = " + ".join(str(p) for p in paths) or "<defaults>"
    if overrides:
        origin += " with --set " + " ".join(overrides)
    return validate(raw, origin)


def config_from_text(text: str, origin: str = "<config text>", overrides: list[str] = ()) -> RunConfig:
    """A resolved config passed as YAML text (how pipeline components receive it), with `--set` overrides."""
    try:
        data = _load_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: a config must be a mapping, got {type(data).__name__}")
    for override in overrides:
        data = deep_merge(data, parse_override(override))
    return validate(data, origin + (" with --set " + " ".join(overrides) if overrides else ""))


def to_yaml(config: RunConfig) -> str:
    """The config as YAML that loads back to the same config."""
    return yaml.dump(json.loads(config.model_dump_json()), Dumper=_ConfigDumper, sort_keys=False)


def flatten(config: RunConfig) -> dict[str, str]:
    """Dotted key -> value string, for MLflow params."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = json.dumps(node) if isinstance(node, (list, bool)) or node is None else str(node)

    walk(json.loads(config.model_dump_json()), "")
    return out


def write_resolved(config: RunConfig, out_dir: Path) -> Path:
    """Write `resolved-config.yaml` into `out_dir` atomically; every step output carries one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "resolved-config.yaml"
    atomic_write_text(target, to_yaml(config))
    return target


# ------------------------------------------------------------------------------------ command line
def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--config FILE` (repeatable, later files overlay earlier ones) and `--set KEY=VALUE` (repeatable)."""
    parser.add_argument("--config", action="append", required=required, default=None, metavar="FILE",
                        help="YAML config; repeat to overlay (e.g. configs/pretrained.yaml configs/v100-32gb.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one key, e.g. --set training.frozen.epochs=2")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The validated RunConfig named by --config/--set."""
    return load_config(args.config or [], args.overrides)
