"""`fleetlm serve`'s flags, generated from the deployment schema's fields (name, description,
default), and the effective config: schema defaults < the YAML file < flags.

Flags of the engine and HTTP settings are spelled as `vllm serve` spells them (the field
name, dashed: `--max-num-seqs`); the other sections' flags carry their section's name
(`--replicas-num-cpus`). Every value is checked once, by the schema, like a YAML file's.
"""

from __future__ import annotations

import argparse
import json
import types
from functools import partial
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ByteSize
from pydantic.fields import FieldInfo

from fleetlm.cluster.config import ClusterConfig, parse_config, read_yaml
from fleetlm.executor.settings import dotted_key

FLAT_SECTIONS = ("model", "engine", "parallel", "http")
PREFIXED_SECTIONS = ("replicas", "router", "migration")
# vLLM's spelling where it differs from the key and means the same.
FLAG_NAMES = {("http", "api_keys"): "--api-key", ("replicas", "count"): "--data-parallel-size"}
# The MODEL_OR_CONFIG argument, and prefill/decode pools (not implemented yet).
NOT_FLAGS = {("model", "name"), ("pd",)}
YAML_SUFFIXES = (".yaml", ".yml")
_DEST_PREFIX = "set:"  # argparse destinations of config flags: "set:http.port"


def add_config_arguments(parser: argparse.ArgumentParser, is_required: bool = False) -> None:
    """MODEL_OR_CONFIG and one flag per setting, grouped by section."""
    parser.add_argument(
        "model_or_config", nargs=None if is_required else "?", metavar="MODEL_OR_CONFIG",
        help="a deployment YAML (.yaml), or the model to serve: a built-in name, a Hugging "
        "Face model folder or a .gguf file (default: the built-in smollm2-135m-instruct)")
    fields = ClusterConfig.model_fields
    for name, field in fields.items():  # scalars, and optional sections as one JSON flag
        if name not in FLAT_SECTIONS + PREFIXED_SECTIONS and (name,) not in NOT_FLAGS:
            _add_flag(parser, (name,), field)
    for section in FLAT_SECTIONS + PREFIXED_SECTIONS:
        field = fields[section]
        group = parser.add_argument_group(f"{section} ({field.description})")
        for key, subfield in field.annotation.model_fields.items():
            if (section, key) not in NOT_FLAGS:
                _add_flag(group, (section, key), subfield)


def _add_flag(group, path: tuple[str, ...], field: FieldInfo) -> None:
    name = flag_name(path)
    default = field.get_default(call_default_factory=True)
    shown = json.dumps(default.model_dump() if isinstance(default, BaseModel) else default)
    help_text = f"{field.description} [{'.'.join(path)}; default: {shown}]".replace("%", "%%")
    group.add_argument(name, dest=_DEST_PREFIX + ".".join(path), default=argparse.SUPPRESS,
                       help=help_text, **_parsing(path, field.annotation))


def _parsing(path: tuple[str, ...], annotation: Any) -> dict:
    """How argparse reads a field of this type; pydantic checks the value afterwards."""
    annotation = _without_none(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is Literal:
        return {"choices": get_args(annotation)}
    if isinstance(annotation, type) and issubclass(annotation, ByteSize):
        return {"metavar": "BYTES"}  # "512MiB" or a number
    metavar = path[-1].upper()
    if annotation in (int, float, str):
        return {"type": annotation, "metavar": metavar}
    if path == ("http", "api_keys"):
        return {"action": "append", "metavar": "KEY"}  # repeat for several keys
    if get_origin(annotation) is list:
        return {"nargs": "+", "type": get_args(annotation)[0], "metavar": metavar}
    return {"type": json.loads, "metavar": "JSON"}  # mappings and whole sections


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def overrides(args: argparse.Namespace) -> dict:
    """The settings given as flags, nested as in the YAML: {"http": {"port": 8123}}."""
    nested: dict = {}
    for dest, value in vars(args).items():
        if dest.startswith(_DEST_PREFIX):
            *sections, key = dest.removeprefix(_DEST_PREFIX).split(".")
            target = nested
            for section in sections:
                target = target.setdefault(section, {})
            target[key] = value
    return nested


def effective_config(model_or_config: str | None, flags: dict) -> ClusterConfig:
    """Schema defaults, overridden by the YAML file (or the model named), overridden by
    `flags`; ValueError naming the source and each bad key."""
    data: dict = {}
    source = "the defaults"
    if model_or_config is not None and Path(model_or_config).suffix in YAML_SUFFIXES:
        data, source = read_yaml(model_or_config), model_or_config
    elif model_or_config is not None:
        data = {"model": {"name": model_or_config}}
    if flags:
        source += " and flags"
    return parse_config(_merged(data, flags), source, partial(_key_or_flag, flags))


def _key_or_flag(flags: dict, loc: tuple) -> str:
    """"http.port (--port)" where a flag set the key, else "http.port"."""
    key = dotted_key(loc)
    path = tuple(map(str, loc[:2] if loc and loc[0] in FLAT_SECTIONS + PREFIXED_SECTIONS
                     else loc[:1]))
    value = flags
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return key
        value = value[part]
    return f"{key} ({flag_name(path)})"


def flag_name(path: tuple[str, ...]) -> str:
    """The flag of the setting at `path`: ("http", "port") -> "--port", ("speculative",)
    (a whole optional section, as JSON) -> "--speculative-config" as vLLM names it."""
    if path in FLAG_NAMES:
        return FLAG_NAMES[path]
    if len(path) == 1 and _is_section(ClusterConfig.model_fields[path[0]].annotation):
        return f"--{path[0]}-config".replace("_", "-")
    return "--" + "-".join(
        path if path[0] in PREFIXED_SECTIONS else path[-1:]).replace("_", "-")


def _is_section(annotation: Any) -> bool:
    annotation = _without_none(annotation)
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _merged(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        below = merged.get(key)
        is_section = isinstance(value, dict) and isinstance(below, dict)
        merged[key] = _merged(below, value) if is_section else value
    return merged


def to_yaml(config: ClusterConfig) -> str:
    """The config as a deployment YAML that loads back into the same config."""
    data = config.model_dump(mode="json")
    return yaml.safe_dump({"name": data.pop("name"), **data}, sort_keys=False)
