"""Typed YAML: a YAML file plus dotted `key=value` overrides, read into nested dataclasses.

The engine knows dataclasses and type hints, nothing of any particular config. Every value is
checked against its field's type as it is read (ints, floats, bools, strings, Literal choices,
unions, lists, tuples, dicts, nested dataclasses); a mistake raises `ConfigError` with the file:line
or the override it came from, the dotted key, and for a misspelling the closest known key:

    config, origins = load(RunConfig, "run.yaml", ["optimizer.lr=3e-4"])

A field whose type needs more than these rules gets a custom reader: `readers={SomeType: read}`,
where `read(value, key, reader)` returns the field's value from the raw YAML value, its dotted key
and this module's `Reader` (for `coerce`, `mapping` and `fail`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
CustomReader = Callable[[Any, str, "Reader"], Any]


class ConfigError(ValueError):
    """An invalid value in a config file or override: `message`, the dotted `field` to blame (None when
    no single field is) and `where` it was set (a file:line, a command-line override). str() joins
    what is known: "run.yaml:7: model.attn_config.alibi_bias_max: expected > 0, got -1".
    """

    def __init__(self, message: str, *, field: str | None = None, where: str | None = None):
        self.message, self.field, self.where = message, field, where
        super().__init__(str(self))

    def __str__(self) -> str:
        return ": ".join(part for part in (self.where, self.field, self.message) if part)

    def __reduce__(self):  # keyword-only arguments: rebuild from the message, then restore the rest
        return (type(self), (self.message,), dict(self.__dict__))


def load(cls: type[T], path: str | Path | None, overrides: list[str] = (), *,
         readers: Mapping[type, CustomReader] | None = None,
         override_example: str = "section.key=value") -> tuple[T, Origins]:
    """Read `path` (None: start from the defaults), apply the overrides, build a checked `cls`.

    Returns the config and where each key came from (for checks the caller adds).
    """
    raw, origins = read_sources(path, overrides, override_example)
    return Reader(origins, readers).build(cls, raw, ""), origins


def read_sources(path: str | Path | None, overrides: list[str] = (),
                 override_example: str = "section.key=value") -> tuple[dict[str, Any], Origins]:
    """The untyped tree of the YAML file with the dotted overrides set in it, and its origins."""
    raw: dict[str, Any] = {}
    origins = Origins()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config: {exc.strerror}", where=str(path)) from None
        try:
            raw = yaml.safe_load(text) or {}
            origins.index_yaml(path, yaml.compose(text))
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {exc}", where=str(path)) from None
        if not isinstance(raw, dict):
            raise ConfigError("expected a mapping of sections at the top level", where=str(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, e.g. {override_example}", where=f"override {item!r}")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key.split("."), value, item)
        origins.add_override(key, item)
    return raw, origins


def _set_dotted(tree: dict, keys: list[str], value: Any, item: str) -> None:
    for depth, key in enumerate(keys[:-1]):
        child = tree.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[: depth + 1])} is not a section", where=f"override {item!r}")
        tree = child
    tree[keys[-1]] = value


class Origins:
    """Where each dotted key came from (file:line or the command line), for error messages."""

    def __init__(self):
        self._where: dict[str, str] = {}
        self._source = "config"

    def index_yaml(self, path: Path, node: yaml.Node | None, prefix: str = "") -> None:
        self._source = str(path)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                self._where[key] = f"{path}:{key_node.start_mark.line + 1}"
                self.index_yaml(path, value_node, key + ".")

    def add_override(self, key: str, item: str) -> None:
        self._where[key] = f"override {item!r}"

    def where(self, key: str) -> str:
        while key:
            if key in self._where:
                return self._where[key]
            key = key.rpartition(".")[0]
        return self._source

    def fail(self, key: str, message: str) -> typing.NoReturn:
        raise ConfigError(message, field=key, where=self.where(key))


def suggest(name: Any, choices) -> str:
    """' (did you mean X?)' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def join(key: str, name: str | None) -> str:
    """The dotted key of `name` inside `key` ('' is the top level)."""
    return ".".join(part for part in (key, name) if part)


def type_name(tp) -> str:
    """How an error message names what a field accepts."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict) or dataclasses.is_dataclass(tp):
        return {list: "a list", tuple: "a list"}.get(origin, "a mapping")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


class Reader:
    """Turns untyped YAML values into typed ones, failing with the key's origin."""

    def __init__(self, origins: Origins, readers: Mapping[type, CustomReader] | None = None):
        self.origins = origins
        self.readers = dict(readers or {})

    def fail(self, key: str, message: str) -> typing.NoReturn:
        self.origins.fail(key, message)

    def mapping(self, value: Any, key: str) -> dict:
        """A section's mapping (an empty section is an empty one)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key or "(top level)", f"expected a mapping, got {value!r}")
        return value

    def build(self, cls: type[T], value: Any, key: str) -> T:
        """A dataclass from its section: unknown keys fail; absent ones take the field's default."""
        values = self.mapping(value, key)
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for name, item in values.items():
            path = join(key, name)
            if name not in hints:
                self.fail(path, f"unknown key{suggest(name, known)}; known keys: {', '.join(known)}")
            kwargs[name] = self.coerce(item, hints[name], path)
        return cls(**kwargs)

    def coerce(self, value: Any, tp, key: str) -> Any:
        """`value` as type `tp`, or a ConfigError naming `key` and what was expected."""
        if tp in self.readers:
            return self.readers[tp](value, key, self)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, key)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            return self._union(value, tp, key)
        if origin is Literal:
            if value in args:
                return value
            self.fail(key, f"expected one of {', '.join(map(repr, args))}, got {value!r}{suggest(value, args)}")
        if origin is list or (origin is tuple and args[-1] is Ellipsis):  # tuple[X, ...] reads as a list
            items = [value] if isinstance(value, str) else value
            if isinstance(items, (list, tuple)):
                return origin(self.coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
        elif origin is tuple:
            if isinstance(value, (list, tuple)) and len(value) == len(args):
                return tuple(self.coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            self.fail(key, f"expected a list of {len(args)} values, got {value!r}")
        elif origin is dict:
            if isinstance(value, dict):
                return value
        elif (scalar := _scalar(value, tp)) is not _NO_VALUE:
            return scalar
        self.fail(key, f"expected {type_name(tp)}, got {value!r}")

    def _union(self, value: Any, tp, key: str) -> Any:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return self.build(arg, value, key)  # an optional section: its own errors name the bad key
            try:
                return self.coerce(value, arg, key)
            except ConfigError:
                pass
        self.fail(key, f"expected {type_name(tp)}, got {value!r}")


_NO_VALUE = object()


def _scalar(value: Any, tp) -> Any:
    """`value` as the scalar type `tp` (bool, int, float, str), or _NO_VALUE when it is not one."""
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads `6e-4` (no dot) as a string; accept what float() accepts.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    return _NO_VALUE
