"""Typed, validated experiment configs and their `--key=value` command line.

Every task declares one frozen dataclass deriving from `Config`. Fields are
declared with `option(...)`, which records a help text and bounds; the field's
type annotation decides parsing (bool, int, float, str, `Literal[...]` choices,
`tuple[int, ...]` as comma-separated values, `X | None`). Validation runs on
construction, so an invalid config cannot exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from experiment.errors import UsageError

# Every number ends up in a jax array: ints as int32 (JAX's default integer), floats as
# float32. A value outside those ranges would silently wrap or become inf inside the
# program, so it is a usage error here instead.
INT_LIMIT = 2**31 - 1
FLOAT_LIMIT = 3.4028234663852886e38  # float32's largest finite value

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field with a help text and optional bounds (inclusive min/max, strict gt/lt)."""
    bounds = {"min": min, "max": max, "gt": gt, "lt": lt}
    metadata = {"help": help, **{k: v for k, v in bounds.items() if v is not None}}
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple for sequence defaults (configs are immutable)")
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every task config: validated on construction.

    ALIASES maps other accepted option names to a field's name (one idea, one name;
    an older or more familiar name still works on the command line).
    """

    ALIASES: typing.ClassVar[dict[str, str]] = {}

    seed: int = option(0, "random seed (initialisation, data order, corruption)", min=0)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check_field(field, getattr(self, field.name), _field_type(type(self), field.name))
        self.check()

    def check(self) -> None:
        """Cross-field rules; raise `UsageError` naming the bad value."""


def with_defaults(**defaults: Any):
    """Class decorator: new defaults for inherited options, keeping their type, help text
    and bounds (one declaration per option). Put it under `@dataclasses.dataclass`:

        @dataclasses.dataclass(frozen=True)
        @with_defaults(steps=3000, lr_schedule="cosine")
        class Config(TrainConfig): ...
    """

    def apply(cls: type) -> type:
        inherited = {
            f.name: (f, base)
            for base in reversed(cls.__mro__[1:])
            if dataclasses.is_dataclass(base)
            for f in dataclasses.fields(base)
        }
        # the class's own annotations (not a base's), where dataclass looks for fields
        annotations = dict(inspect.get_annotations(cls))
        cls.__annotations__ = annotations
        for name, default in defaults.items():
            if name not in inherited:
                raise TypeError(f"{cls.__name__}: no inherited option {name!r} to give a default")
            if name in annotations:
                raise TypeError(f"{cls.__name__}: {name!r} is declared here; set its default there")
            field, base = inherited[name]
            annotations[name] = _field_type(base, name)
            setattr(cls, name, option(default, **field.metadata))
        return cls

    return apply


def _field_type(cls: type, name: str) -> Any:
    return _type_hints(cls)[name]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """typing.get_type_hints of a config class, evaluated once per class: it evaluates
    every annotation anew on each call (they are strings here), which made building one
    config take about 26 ms, paid by the study process and by every trial's run."""
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def type_name(tp: Any) -> str:
    """Human-readable type for help texts and errors."""
    base, optional = _strip_optional(tp)
    if typing.get_origin(base) is Literal:
        name = "{" + ",".join(str(a) for a in typing.get_args(base)) + "}"
    elif typing.get_origin(base) is tuple:
        name = f"comma-separated {typing.get_args(base)[0].__name__}s"
    else:
        name = base.__name__
    return f"{name} or none" if optional else name


def _check_field(field: dataclasses.Field, value: Any, tp: Any) -> None:
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return
        raise UsageError(f"--{field.name} is required (expected {type_name(tp)})")
    if typing.get_origin(base) is Literal and value not in typing.get_args(base):
        raise UsageError(
            f"--{field.name}={value!r} is not accepted; choose one of "
            + ", ".join(str(a) for a in typing.get_args(base))
        )
    values = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple):  # as it was typed: --sizes=1,2
        value = ",".join(str(v) for v in value)
    meta = field.metadata
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        _check_representable(field.name, value, v)
        if "min" in meta and v < meta["min"]:
            raise UsageError(f"--{field.name}={value}: must be >= {meta['min']}")
        if "max" in meta and v > meta["max"]:
            raise UsageError(f"--{field.name}={value}: must be <= {meta['max']}")
        if "gt" in meta and not v > meta["gt"]:
            raise UsageError(f"--{field.name}={value}: must be > {meta['gt']}")
        if "lt" in meta and not v < meta["lt"]:
            raise UsageError(f"--{field.name}={value}: must be < {meta['lt']}")


def _check_representable(name: str, value: Any, v: int | float) -> None:
    """`v` (one number of option `name`) fits the int32 / finite float32 the program uses."""
    if isinstance(v, int) and abs(v) > INT_LIMIT:
        raise UsageError(f"--{name}={value}: too large; integers must be within +-{INT_LIMIT}")
    if isinstance(v, float) and not math.isfinite(v):
        raise UsageError(f"--{name}={value}: must be a finite number")
    if isinstance(v, float) and abs(v) > FLOAT_LIMIT:
        raise UsageError(
            f"--{name}={value}: overflows float32; numbers must be within +-{FLOAT_LIMIT:.4g}"
        )


def parse_value(name: str, tp: Any, text: str) -> Any:
    """Parse one command-line string into the field's type, or raise `UsageError`."""
    base, optional = _strip_optional(tp)
    if optional and text.strip().lower() in {"none", "null", ""}:
        return None
    try:
        return _parse_base(base, text)
    except ValueError:
        raise UsageError(f"--{name}={text!r}: expected {type_name(tp)}") from None


def _parse_base(tp: Any, text: str) -> Any:
    text = text.strip()
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(text)
    if tp is int:
        number = float(text)  # accepts 1e3 as well as 1000
        if not number.is_integer():
            raise ValueError(text)
        return int(number)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        by_text = {str(c): c for c in choices}
        return by_text.get(text, text)  # membership is checked on construction
    if typing.get_origin(tp) is tuple:
        item_type = typing.get_args(tp)[0]
        parts = [p for p in text.replace(" ", "").strip("[]()").split(",") if p]
        return tuple(_parse_base(item_type, p) for p in parts)
    raise TypeError(f"unsupported config field type {tp!r}")


def to_text(value: Any) -> str:
    """A config value as command-line text that `parse_value` reads back to the same value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(to_text(v) for v in value)
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    return str(value)  # repr-exact for floats


def tokenize(argv: Iterable[str]) -> dict[str, str | None]:
    """Turn `--key=value`, `--key value` and bare `--flag` into {key: text or None}.

    Dashes in keys are read as underscores (`--hidden-size` == `--hidden_size`).
    """
    argv = list(argv)
    options: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise UsageError(f"unexpected argument {token!r}; options look like --key=value")
        key, separator, value = token[2:].partition("=")
        key, has_value = key.replace("-", "_"), bool(separator)
        if not has_value:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                value, has_value = nxt, True
                i += 1
        if key in options:
            raise UsageError(f"--{key} was given twice")
        options[key] = value if has_value else None
        i += 1
    return options


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean --x?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean --{close[0]}?)" if close else ""


def build_config(
    cls: type[Config], raw: Mapping[str, str | None], also_known: Iterable[str] = ()
) -> Config:
    """Build a validated config from tokenized options; unknown keys raise with a suggestion.

    `also_known`: other option names (handled elsewhere) to consider for suggestions.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    raw = _resolve_aliases(cls, raw)
    for key, text in raw.items():
        if key not in fields:
            hint = suggest(key, [*fields, *also_known])
            raise UsageError(f"unknown option --{key}{hint}; see --help")
        tp = _field_type(cls, key)
        if text is None:
            if _strip_optional(tp)[0] is not bool:
                raise UsageError(f"--{key} needs a value ({type_name(tp)})")
            text = "true"
        values[key] = parse_value(key, tp, text)
    return cls(**values)


def _resolve_aliases(cls: type[Config], raw: Mapping[str, str | None]) -> dict:
    """`raw` with every alias key replaced by the field it names (both given: an error)."""
    out = dict(raw)
    for alias, name in cls.ALIASES.items():
        if alias in out:
            if name in out:
                raise UsageError(f"--{alias} is another name for --{name}: give one of them")
            out[name] = out.pop(alias)
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def default_dict(cls: type[Config]) -> dict[str, Any]:
    """`to_dict` of the defaults, also for a class whose defaults alone are not valid."""
    fields = dataclasses.fields(cls)
    return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields}


def from_dict(cls: type[Config], data: Mapping[str, Any]) -> Config:
    """Rebuild a config saved with `to_dict` (unknown keys are an error)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UsageError(f"saved config has options this version does not know: {unknown}")
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def config_help(cls: type[Config]) -> str:
    """One line per option: name, type, default, help."""
    lines = []
    for field in dataclasses.fields(cls):
        tp = type_name(_field_type(cls, field.name))
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(str(d) for d in default)
        lines.append(f"  --{field.name}={tp}  (default: {default})")
        lines.append(f"      {field.metadata.get('help', '')}")
    return "\n".join(lines)
