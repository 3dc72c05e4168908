"""Loading configs: strict YAML, dotted ``section.key=value`` overrides, the resolved config and its hash.

``load_config`` rejects unknown keys (naming the nearest valid one), wrong types and out-of-range
values with a one-line ``UserError`` that names the file or override, the key and what is allowed,
before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import yaml

from rdprune.config.schema import SECTIONS, Config, field_docs
from rdprune.config.values import ConfigError, did_you_mean, show_value
from rdprune.errors import UserError
from rdprune.files import atomic_write_text


def _field_types(section: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _required_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {problem}"


def read_yaml(path: Path) -> dict:
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{label}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{label}: is a directory, expected a YAML config file") from None
    except UnicodeDecodeError:
        raise UserError(f"{label}: not a UTF-8 text file") from None
    except OSError as err:
        raise UserError(f"{label}: cannot read: {err.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise UserError(f"{label}: {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{label}: expected a mapping of sections ({', '.join(SECTIONS)}) at the top level")
    return data


def _unknown_section(section: str) -> str:
    suggestion = did_you_mean(section, list(SECTIONS))
    return f"unknown section {section!r}" + (suggestion or f"; sections are: {', '.join(SECTIONS)}")


def _unknown_key(section: str, key: str) -> str:
    """Suggest the nearest key of the same section, else the same key in another section."""
    names = list(_field_types(SECTIONS[section]))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:
        close = [f"{other}.{key}" for other, cls in SECTIONS.items() if key in _field_types(cls)][:1]
    else:
        close = [f"{section}.{close[0]}"]
    if close:
        return f"unknown key '{section}.{key}' (did you mean {close[0]!r}?)"
    return f"unknown key '{section}.{key}'; {section} has: {', '.join(names)}"


def _check_structure(data: dict) -> None:
    """Unknown sections and keys, and sections that are not mappings (raises ConfigError)."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(str(section), _unknown_section(str(section)))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(section, f"section {section!r} must be a mapping of keys, got {show_value(values)}")
        names = list(_field_types(SECTIONS[section]))
        for key in values:
            if key not in names:
                raise ConfigError(f"{section}.{key}", _unknown_key(section, str(key)))


def _parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); value parsed as YAML, or kept as text for
    string fields so that run.name=2024 stays a string. For a mapping field, 'section.key.name=value'
    sets one entry: (section, key, {name: value}), merged into the mapping by the caller."""
    label = f"override {text!r}"
    if "=" not in text:
        raise UserError(f"{label}: expected section.key=value, e.g. prune.method=lamp")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise UserError(f"{label}: {_unknown_section(section)}")
    types = _field_types(SECTIONS[section])
    if not key:
        raise UserError(f"{label}: {section!r} is a section; set its keys as {section}.<key>=value")
    field_name, _, entry = key.partition(".")
    if entry and typing.get_origin(types.get(field_name)) is dict:
        try:
            return section, field_name, {entry: yaml.load(raw, Loader=_StrictLoader)}  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as err:
            raise UserError(f"{label}: {_yaml_problem(err)}") from None
    if key not in types:
        raise UserError(f"{label}: {_unknown_key(section, key)}")
    try:
        value = yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise UserError(f"{label}: {_yaml_problem(err)}") from None
    hint = types[key]
    accepts_text = hint is str or hint == Optional[str]
    if accepts_text and value is not None and not isinstance(value, str):
        value = raw.strip()
    return section, key, value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``section.key=value`` overrides in order and validate everything.

    Raises UserError with one line naming the file or override, the key and what is allowed.
    """
    path = Path(path)
    return config_from_dict(read_yaml(path), overrides, label=str(path))


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = (), label: str = "config") -> Config:
    """Build a validated Config from YAML-like data (e.g. ``config_to_dict`` output or a stored
    resolved config); ``label`` names the source in error messages."""
    origin: dict[str, str] = {}
    try:
        _check_structure(data)
    except ConfigError as err:
        raise UserError(f"{label}: {err}") from None
    merged: dict[str, dict] = {name: dict(data.get(name) or {}) for name in SECTIONS}
    for text in overrides:
        section, key, value = _parse_override(text)
        entry = "." in text.split("=", 1)[0].strip().partition(".")[2]
        if entry and isinstance(merged[section].get(key), dict):
            value = {**merged[section][key], **value}
        merged[section][key] = value
        origin[f"{section}.{key}"] = f"override {text!r}"

    for key in _required_keys():
        section, name = key.split(".")
        if name not in merged[section]:
            raise UserError(f"{label}: missing required key {key!r} ({_required_hint(key)})")
    try:
        sections = {name: SECTIONS[name](**values) for name, values in merged.items()}
        return Config(**sections)
    except ConfigError as err:
        keys = [re.sub(r"\[\d+\]$", "", k) for k in (err.key, *err.related)]
        source = next((origin[k] for k in keys if k in origin), label)
        raise UserError(f"{source}: {err}") from None


def _required_hint(key: str) -> str:
    section, name = key.split(".")
    doc = field_docs(SECTIONS[section]).get(name, "")
    return doc.removeprefix("Required. ").split(". ")[0].rstrip(".")


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The resolved config as plain YAML-able data; ``config_from_dict`` of it gives an equal Config."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text that ``load_config`` reads back to an equal Config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML atomically (temporary file, then rename)."""
    atomic_write_text(Path(path), config_to_yaml(cfg))


def config_hash(cfg: Config) -> str:
    """First 16 hex digits of the sha256 of the canonical resolved config (keys sorted, JSON)."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
