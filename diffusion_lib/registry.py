"""Named components (strategies, samplers, models, tasks) in one `Registry` type, and the one option schema:
an `Option` types every component option and every run-config key (harness/config.py), so each value takes one
path (coercion, finiteness, range). No torch here: the command line validates a config before loading it."""
from __future__ import annotations

import copy
import difflib
import math
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar


# -- messages -----------------------------------------------------------------------------------------------
def suggest(key: str, allowed: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest allowed name, or '' when nothing is close."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 60
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = 8
_BRIEF.maxlevel = 3


def brief_repr(value: Any) -> str:
    """repr() cut to a line: error messages quote user values, which may be huge or deeply nested."""
    return _BRIEF.repr(value)


# -- options --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    kind: type  # int, float, str, bool, list, or dict (a component's map, which `resolve` fills in)
    default: Any
    valid: Callable[[Any], bool] = lambda v: True
    requirement: str = ""  # what `valid` asks for, in words ("an int >= 1")
    item: type | None = None  # list: each item coerced as a value of this kind (int or float)
    resolve: Callable[[Any], Any] | None = None  # dict: a registry's resolve (ValueError says what is wrong)


def one_of(*choices: str) -> Option:
    """A string option whose first choice is the default."""
    return Option(str, choices[0], lambda v: v in choices, "one of " + ", ".join(choices))


def int_in(low: int, high: int, default: int) -> Option:
    return Option(int, default, lambda v: low <= v <= high, f"an int in [{low}, {high}]")


class OptionError(ValueError):
    """A value its option refuses; `problem`: 'type', 'finite', 'range', or 'resolve' (the message says why)."""

    def __init__(self, problem: str, value: Any, why: str = ""):
        super().__init__(why or problem)
        self.problem, self.value = problem, value


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return all(_finite(v) for v in value) if isinstance(value, list) else True


def _scalar(kind: type, value: Any, whole: Any) -> Any:
    """`value` as a `kind`: ints pass for floats (as floats), bools never for numbers, and a float may be text
    (YAML 1.1 reads 1e-4, without a dot, as a string). A type error names `whole`, the value as given."""
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise OptionError("type", whole) from None
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise OptionError("type", whole)
    if kind is float:
        try:
            value = float(value)
        except OverflowError:  # an int beyond any float
            value = math.inf
        if not math.isfinite(value):  # inf and nan pass every `v > 0` style check
            raise OptionError("finite", value)
    return value


def coerce(option: Option, value: Any) -> Any:
    """`value` as the option's kind, finite and valid; else OptionError naming the problem."""
    if option.resolve is not None:
        try:
            return option.resolve(value)
        except ValueError as error:
            raise OptionError("resolve", value, str(error)) from None
    if option.kind is not list:
        value = _scalar(option.kind, value, value)
    elif not isinstance(value, (list, tuple)):
        raise OptionError("type", value)
    elif option.item is not None:
        value = [_scalar(option.item, v, value) for v in value]
    elif not _finite(list(value)):
        raise OptionError("finite", value)
    value = list(value) if option.kind is list else value
    if not option.valid(value):
        raise OptionError("range", value)
    return value


def check_option(label: str, option: Option, value: Any) -> Any:
    """The value, coerced to the option's kind; ValueError '<label> = <value> is invalid: must be ...'."""
    try:
        return coerce(option, value)
    except OptionError as error:
        if error.problem == "finite":
            raise ValueError(f"{label} = {error.value} is invalid: must be a finite number") from None
        why = str(error) if error.problem == "resolve" else f"must be {option.requirement}"
        raise ValueError(f"{label} = {brief_repr(error.value)} is invalid: {why}") from None


def resolve_options(where: str, values: Mapping[str, Any], options: dict[str, Option], context: str = "") -> dict[str, Any]:
    """Validate `values` against `options` and fill in defaults, in the options' order.

    `where` names the map in messages ("mining_config" -> "mining_config['opt_steps'] = 0 is invalid: ...");
    `context` follows an unknown key's message (" for strategy 'random'"). Raises ValueError in one line,
    naming the key or value and what is allowed (with the closest allowed key, if one is close).
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a mapping of keys, got {type(values).__name__}")
    for key in values:
        if key not in options:
            allowed = list(options)
            raise ValueError(
                f"{where} has unknown key {brief_repr(key)}{context}{suggest(str(key), allowed)}; allowed: {', '.join(allowed)}"
            )
    return {
        key: check_option(f"{where}['{key}']", option, values[key]) if key in values else copy.copy(option.default)
        for key, option in options.items()
    }


# -- registries -------------------------------------------------------------------------------------------
T = TypeVar("T")


class Registry(dict[str, T]):
    """Components of one kind by name (a dict); each has `options` (dict[str, Option]) on top of `common`.

    A user's map names its component under `key` ("strategy", "name", "dataset"; `default` if absent);
    messages call the map `where` ("mining_config"), a component a `kind` ("strategy") and quote a name
    after `label` (by default "mining_config['strategy'] =").
    """

    def __init__(self, where: str, key: str, default: str, kind: str, common: dict[str, Option] | None = None,
                 label: str = ""):
        self.where, self.key, self.default, self.kind = where, key, default, kind
        self.common = common or {}
        self.label = label or f"{where}['{key}'] ="

    def register(self, name: str, entry: T) -> T:
        self[name] = entry
        return entry

    def lookup(self, name: Any) -> T:
        """The component `name`; ValueError in one line naming the closest name when none fits."""
        label, allowed = f"{self.label} {brief_repr(name)}", ", ".join(self)
        if not isinstance(name, str):  # a list or a mapping (not even hashable) names nothing
            raise ValueError(f"{label} must be one {self.kind} name; allowed: {allowed}")
        if name not in self:
            raise ValueError(f"{label} is unknown{suggest(name, list(self))}; allowed: {allowed}")
        return self[name]

    def name_of(self, config: Mapping[str, Any]) -> str:
        name = config.get(self.key, self.default)
        self.lookup(name)
        return name

    def resolve(self, config: Any) -> dict[str, Any]:
        """{key: name, **the component's options validated, defaults filled in}; ValueError in one line."""
        if not isinstance(config, Mapping):
            raise ValueError(f"{self.where} must be a mapping of keys, got {type(config).__name__}")
        name = self.name_of(config)
        given = {k: v for k, v in config.items() if k != self.key}
        options = {**self.common, **self[name].options}
        return {self.key: name, **resolve_options(self.where, given, options, f" for {self.kind} '{name}'")}
