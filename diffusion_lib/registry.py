"""One schema for every registered component's options (mining strategies, tasks, models, samplers).

An `Option` names a key's type, default and the check its value must pass; `resolve_options` validates a
user's map against a dict of them once, filling in defaults. Limits (an upper bound on a size) live in
the option's check, so a key is validated in one place on its way from a YAML file to the code using it.
This module imports no torch: the command line validates a config before loading it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from diffusion_lib.text import brief_repr, suggest


@dataclass(frozen=True)
class Option:
    kind: type  # int, float, str, bool or list
    default: Any
    valid: Callable[[Any], bool]
    requirement: str  # what `valid` asks for, in words ("an int >= 1")


def one_of(*choices: str) -> Option:
    """A string option whose first choice is the default."""
    return Option(str, choices[0], lambda v: v in choices, "one of " + ", ".join(choices))


def int_in(low: int, high: int, default: int) -> Option:
    return Option(int, default, lambda v: low <= v <= high, f"an int in [{low}, {high}]")


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _coerce(option: Option, value: Any) -> tuple[Any, bool]:
    """(value, whether its type fits): ints pass for floats (as floats); bools never pass for numbers."""
    if option.kind is bool:
        return value, isinstance(value, bool)
    if isinstance(value, bool):
        return value, False
    if option.kind is float and isinstance(value, int):
        try:
            return float(value), True
        except OverflowError:  # an int beyond any float
            return math.inf, True
    return value, isinstance(value, option.kind)


def check_option(label: str, option: Option, value: Any) -> Any:
    """The value, coerced to the option's kind; ValueError '<label> = <value> is invalid: must be ...'."""
    value, fits = _coerce(option, value)
    if fits and not _finite(value):  # inf and nan pass every `v > 0` style check
        raise ValueError(f"{label} = {value} is invalid: must be a finite number")
    if not fits or not option.valid(value):
        raise ValueError(f"{label} = {brief_repr(value)} is invalid: must be {option.requirement}")
    return value


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
