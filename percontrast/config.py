"""Config dataclasses <-> command line flags <-> YAML files.

Every command has one dataclass (e.g. ``TrainConfig``); its fields carry
``metadata={"help": ...}``. The same class is filled from Python keyword arguments,
from a YAML file (``--config``) and from flags, with precedence
defaults < YAML < flags. Field ``clip_min`` is the flag ``--clip-min``.
Bad keys or values are ``UserError``s naming the file and key.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from .errors import UserError

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, choices: tuple | None = None,
          default_factory: Any = dataclasses.MISSING, flag: str | None = None,
          positional: bool = False) -> Any:
    """A dataclass field with CLI help (and optional choices / custom flag name / positional)."""
    md: dict[str, Any] = {"help": help, "positional": positional}
    if choices is not None:
        md["choices"] = tuple(choices)
    if flag is not None:
        md["flag"] = flag
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value to the annotated type; raise UserError naming ``where``."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: must not be empty (expected {getattr(base, '__name__', base)})")
    origin = get_origin(base)
    if origin is Literal:
        if value not in get_args(base):
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, get_args(base)))}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(base) or (str,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {type(value).__name__}")
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or base is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {type(value).__name__}")
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "false", "no", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if base is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: expected a string, got {type(value).__name__}")
        return str(value)
    return value


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: config file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not valid UTF-8 (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)  # safe loader: no arbitrary Python objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of config keys at the top level")
    return data


def check_values(cls: type, values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Reject unknown keys and coerce values to the field types, naming ``source`` and the key."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields)
    out = {}
    for key, value in values.items():
        k = str(key).replace("-", "_")
        if k not in names:
            close = sorted(n for n in names if n.startswith(k[:4]))
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{source}: unknown key {key!r}{hint}")
        out[k] = coerce(value, hints[k], f"{source}: key '{key}'")
        choices = fields[k].metadata.get("choices")
        if choices and isinstance(out[k], (str, int, float)) and out[k] not in choices:   # argparse checks flags; YAML / Python values land here
            raise UserError(f"{source}: key '{key}': {out[k]!r} is not one of {', '.join(map(str, choices))}")
    return out


def build(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Instantiate ``cls`` from a dict, rejecting unknown keys and wrong types."""
    kwargs = check_values(cls, values, source)
    missing = [f for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        shown = [f.name if f.metadata.get("positional") else "--" + f.name.replace("_", "-") for f in missing]
        raise UserError(f"{source}: missing required option(s): {', '.join(shown)}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise UserError(f"{source}: {e}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field; defaults are SUPPRESSed so that we can tell what was given."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f.metadata.get("help", "")
        if default not in (None, "", []):
            help_ += f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_.replace("%", "%%")}
        if f.metadata.get("positional"):
            kw.pop("dest")
            flag, kw["nargs"] = f.name, "?"
            if f.metadata.get("choices"):
                kw["choices"] = list(f.metadata["choices"])
            parser.add_argument(flag, **kw)
            continue
        if tp is bool:
            if flag.startswith("--no-"):
                # BooleanOptionalAction reads any "--no-..." as False: a field named no_x gets one plain
                # switch that sets it (before this, --no-profile silently left no_profile False)
                parser.add_argument(flag, action="store_const", const=True, **kw)
            else:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        choices = f.metadata.get("choices") or (get_args(tp) if get_origin(tp) is Literal else None)
        if choices:
            kw["choices"] = list(choices)
        if get_origin(tp) in (list, tuple):
            kw["nargs"] = "+"
            kw["action"] = "extend"   # --x A --x B and --x A B both give [A, B]
            kw["metavar"] = "X"
        elif not choices:  # with choices argparse shows {a,b,c} itself
            kw["metavar"] = {int: "N", float: "X"}.get(tp, "VALUE")
        parser.add_argument(flag, **kw)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Defaults < YAML (``args.config``, when the command has that flag) < flags given."""
    names = {f.name for f in dataclasses.fields(cls)}
    merged: dict[str, Any] = {}
    cfg_path = getattr(args, "config", None) if "config" not in names else None
    from_yaml: dict[str, Any] = {}
    if cfg_path:
        from_yaml = check_values(cls, read_yaml(cfg_path), source=str(cfg_path))
        merged.update(from_yaml)
    given = {n: getattr(args, n) for n in names if hasattr(args, n)}
    merged.update(given)
    try:
        return build(cls, merged, source=str(cfg_path) if cfg_path else "command line")
    except UserError as e:
        # A value check in __post_init__ names the field; name the YAML file too when it set that field.
        msg = str(e)
        culprits = [k for k in from_yaml if k not in given and (k in msg or k.replace("_", "-") in msg)]
        if cfg_path and culprits and not msg.startswith(str(cfg_path)):
            raise UserError(f"{cfg_path}: key '{culprits[0]}': {msg}") from None
        raise
