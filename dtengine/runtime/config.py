"""Config loading: a schema (a dataclass of small per-component dataclasses) filled from YAML + dotted overrides.

    cfg = load_config("configs/demo.yaml", ["train.steps=50", "out_dir=runs/x"], schema=RunConfig)

The schema is passed in: this module knows no component. Unknown keys and values of the wrong type are
`ConfigError`s naming the key (and the closest valid one); range checks live in each component's
`__post_init__`. Loops write the resolved config into their output folder with `config_to_yaml`.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dtengine.runtime.errors import ConfigError

Schema = TypeVar("Schema")


def _field_type(schema: type, dotted_key: str) -> Any:
    """The annotated type of a dotted key in the schema, or None when the key is not a field."""
    node: Any = schema
    for part in dotted_key.split("."):
        if not is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node


def _valid_keys(schema: type, dotted_parent: str) -> list[str]:
    node: Any = schema
    for part in [p for p in dotted_parent.split(".") if p]:
        hints = typing.get_type_hints(node)
        node = hints.get(part)
        if node is None or not is_dataclass(node):
            return []
    return [f.name for f in fields(node)]


def _explain(err: OmegaConfBaseException, schema: type) -> ConfigError:
    key = err.full_key or str(getattr(err, "key", "") or "")
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, ConfigKeyError) or "not in" in message:
        parent, _, leaf = key.rpartition(".")
        options = _valid_keys(schema, parent)
        prefix = f"{parent}." if parent else ""
        close = difflib.get_close_matches(leaf, options, n=1, cutoff=0.5)
        hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys here: {', '.join(options)}"
        return ConfigError(f"unknown config key '{key}'; {hint}")
    if isinstance(err, ValidationError):
        return ConfigError(f"config key '{key}' has the wrong type: {message}")
    return ConfigError(f"config error at '{key}': {message}")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, schema: type[Schema]
) -> Schema:
    """Build a `schema` instance from its defaults, then the YAML file at `path`, then `key=value` overrides.

    Raises:
        ConfigError: missing or invalid file, unknown key, wrong type, or a value a component rejects.
    """
    merged = OmegaConf.structured(schema)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.create(_read_yaml(Path(path))))
        for override in overrides:
            if "=" not in override or override.startswith("="):
                raise ConfigError(f"override '{override}' is not of the form key=value (e.g. train.steps=100)")
            key, _, value = override.partition("=")
            if _field_type(schema, key.strip()) is str:
                # Text fields take the text as typed: YAML would read 10:12 as the base-60 number 612.
                merged = OmegaConf.merge(merged, OmegaConf.create(_nest(key.strip(), value)))
            else:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, schema) from None


def _nest(dotted_key: str, value: Any) -> dict:
    for part in reversed(dotted_key.split(".")):
        value = {part: value}
    return value


def config_from_dict(values: dict | None, *, schema: type[Schema], what: str = "config") -> Schema:
    """A `schema` instance from a plain dict (e.g. a section of a saved run config); missing keys keep defaults.

    Raises:
        ConfigError: naming `what`, when the dict does not fit the schema.
    """
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values or {}))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{what} is invalid: {_explain(err, schema)}") from None


def config_to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
