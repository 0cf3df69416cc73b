"""Build typed dataclasses from plain dicts (YAML), with errors that name the key.

`from_dict(Cls, data)` checks every key against the dataclass fields (an unknown
key is an error naming it and listing the known ones), converts nested dicts
into nested dataclasses and checks scalar types. Range checks live in each
dataclass's `validate()` method, which `from_dict` calls when present.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(_not_a_choice(key, value, allowed))
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} ({value!r})")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_convert(k, k_tp, f"{key}.{k}"): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e9" as a string; accept numeric strings.
            number = None
            if isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    pass
            if number is None:
                raise ConfigError(f"{key}: expected a number, got {value!r}")
            value = number
        if not math.isfinite(value):  # .inf / .nan would pass every >= check and break later
            raise ConfigError(f"{key}: expected a finite number, got {value!r} (where a key allows no limit, it takes null)")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    return value


def _not_a_choice(key: str, value: Any, allowed: tuple) -> str:
    return f"{key}: must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"


def _choices(tp: Any) -> tuple | None:
    """The values a Literal (or optional Literal) type allows, else None."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (Union, types.UnionType):
        for arg in get_args(tp):
            if get_origin(arg) is Literal:
                return get_args(arg)
    return None


def check_choices(obj: Any, prefix: str = "") -> None:
    """Raise a ConfigError naming the key when a Literal-typed field of dataclass `obj` (or of
    a dataclass inside it) holds a value its type does not list: the check for configs built
    in code as well as from YAML."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_choices(value, f"{prefix}{f.name}.")
            continue
        allowed = _choices(hints[f.name])
        if allowed is not None and value is not None and value not in allowed:
            raise ConfigError(_not_a_choice(f"{prefix}{f.name}", value, allowed))


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be numbers: 1: x
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}"
            + (f" (and {', '.join(prefix + str(u) for u in unknown[1:])})" if len(unknown) > 1 else "")
            + f"; known keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{prefix}{name}")
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a (nested) dataclass, for YAML/JSON output."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two plain-data configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` laid on top: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with one key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: SafeLoader merges it in
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(None, None, f"a mapping key must be a name, got {key!r}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        _refuse_yaml11_number(self.construct_scalar(node), node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        _refuse_yaml11_number(self.construct_scalar(node), node)
        return super().construct_yaml_float(node)


def _refuse_yaml11_number(text: str, node: yaml.ScalarNode) -> None:
    """YAML 1.1 (PyYAML) reads 010 as 8 (octal) and 1:30 as 90 (base 60), which YAML 1.2 and a
    reader do not: such a number is refused instead of changed silently."""
    digits = text.lstrip("+-").replace("_", "")
    if ":" in text or (len(digits) > 1 and digits[0] == "0" and digits[1:2].isdigit()):
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is ambiguous (YAML 1.1 reads a leading 0 as octal and a ':' as base 60): "
                                                "write the number without them, or quote it for a string", node.start_mark)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _UniqueKeyLoader.construct_yaml_float)


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"malformed YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, turning parse errors into a ConfigError naming the file and line.

    `extends: other.yaml` (relative to this file) reads that file first and lays this one
    on top of it (deep_merge), so a variant states only what differs.
    """
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: extends itself (through {' -> '.join(p.name for p in _seen)})")
    data = _read_mapping(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must name one YAML file, got {parent!r}")
    return deep_merge(read_yaml(path.parent / parent, (*_seen, path.resolve())), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse a `--set a.b.c=value` override; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.epochs=2)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        return key.split("."), yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({getattr(exc, 'problem', exc)}); quote it or close its brackets") from exc


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key=value` override applied."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a mapping")
        old = node.get(path[-1])
        # a mapping merges into the mapping it names (as `extends:` does): `method={alast: {k: 4}}`
        # changes k, not the rest of method
        node[path[-1]] = deep_merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return out
