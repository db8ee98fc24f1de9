"""Config files, presets, command-line overrides and the field listing.

A config file is YAML with top-level sections (model, attention, moe, train, data, parallel,
checkpoint, log, guard, faults, run). Two keys compose files: `preset: NAME` pulls
`configs/models/NAME.yaml` and `hardware: NAME` pulls `configs/hardware/NAME.yaml`; the file's own
sections override them, and command-line overrides come last.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from dsmoe.config.schema import CONFIG_ROOT, SECTIONS, Config, ConfigError
from dsmoe.config.validate import validate


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _near(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for a in inner[:-1]:  # the first type that takes the value (Literal["off", "on"] before str)
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], where)
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:  # YAML reads `off` as false
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{where}: '{value}' is not one of {list(args)}.{_near(str(value), args)}")
        return value
    if origin is list:
        (item,) = args
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, val in extra.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **val}
        else:
            out[key] = val
    return out


def _resolve_named(kind: str, name: str, relative_to: Path | None) -> Path:
    """`preset: tiny` -> configs/models/tiny.yaml; a path works too."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.append(relative_to.parent / name)
    candidates.append(CONFIG_ROOT / kind / f"{name}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))
    what = {"models": "preset", "hardware": "hardware profile"}[kind]
    raise ConfigError(f"{what} '{name}' not found (a file, or a name in {CONFIG_ROOT / kind}); known {what}s: "
                      f"{', '.join(known)}.{_near(name, known)}")


def load_yaml_tree(path: str | Path) -> dict:
    """Read a YAML config and the files it names (`preset:`, `hardware:`), later keys winning."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found (presets live in {CONFIG_ROOT / 'models'})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    tree: dict = {}
    for key, kind in (("preset", "models"), ("hardware", "hardware")):
        if key in raw:
            tree = _merge(tree, load_yaml_tree(_resolve_named(kind, str(raw.pop(key)), path)))
    return _merge(tree, raw)


def parse_overrides(argv: list[str]) -> dict:
    """`--section.field=value` or `--section.field value` -> nested dict of strings."""
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.field=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            i += 1
            value = argv[i]
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return out


def from_dict(tree: dict) -> Config:
    classes = _section_classes()
    sections = {}
    for section, values in tree.items():
        if section not in classes:
            raise ConfigError(f"unknown config section '{section}'.{_near(section, classes)} Sections: {', '.join(classes)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section}' must be a mapping of fields, got {values!r}")
        cls = classes[section]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            if name not in hints:
                raise ConfigError(f"unknown key '{section}.{name}'.{_near(name, hints)} "
                                  f"Fields of '{section}': {', '.join(hints)}")
            kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
        sections[section] = cls(**kwargs)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """The resolved config: defaults <- preset/hardware <- file <- overrides."""
    return config_from_tree(load_yaml_tree(path) if path is not None else {}, overrides)


def config_from_tree(tree: dict, overrides: list[str] | dict | None = None) -> Config:
    """A config tree (e.g. one stored in a checkpoint) with `--section.field=value` overrides on top."""
    if overrides:
        tree = _merge(tree, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return from_dict(tree)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _yaml_value(value: Any) -> str:
    """A value as YAML spells it (null, true, [a, b]) on one line."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def help_text(tree: dict | None = None, source: str | None = None) -> str:
    """Every field with its default (YAML spelling) and one-line doc; with `tree`, the values that
    config file sets replace the defaults and are marked `*`."""
    rows = []
    for section, cls in _section_classes().items():
        rows.append((f"{section}:", "", ""))
        for f in dataclasses.fields(cls):
            default = _yaml_value(f.default if f.default is not dataclasses.MISSING else f.default_factory())
            value, text = default, f.metadata.get("doc", "")
            if tree and f.name in (tree.get(section) or {}):
                value = _yaml_value(tree[section][f.name]) + " *"
                text += f" [default {default}]" if value[:-2] != default else ""
            rows.append((f"  --{section}.{f.name}", value, text))
    name_w = max(len(r[0]) for r in rows if r[2])
    value_w = min(max(len(r[1]) for r in rows), 24)
    lines = [f"* = set by {source}" if tree else "defaults shown; --config FILE --help-config shows a run's values"]
    lines += [r[0] if not r[2] else f"{r[0]:<{name_w}}  {r[1]:<{value_w}}  {r[2]}" for r in rows]
    return "\n".join(lines)
