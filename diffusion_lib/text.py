"""Text for messages and file names: did-you-mean suggestions, values cut to a line, slugs."""
from __future__ import annotations

import difflib
import re
import reprlib
from typing import Any


def suggest(key: str, allowed: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest allowed name, or '' when nothing is close."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 60
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = 8
_BRIEF.maxlevel = 3


def slug(value: Any) -> str:
    """`value` as text fit for a file name: anything but letters, digits, '.', '+' and '-' becomes '-'."""
    return re.sub(r"[^\w.+-]", "-", str(value))


def brief_repr(value: Any) -> str:
    """repr() cut to a line: error messages quote user values, which may be huge or deeply nested."""
    return _BRIEF.repr(value)
