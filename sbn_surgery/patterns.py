"""Bounded pattern matching for recipes: globs and ``re:`` regular expressions.

A recipe comes from a user or a colleague, so a pattern may backtrack catastrophically (nested
quantifiers such as ``re:(a|aa)+$``). Regular expressions run on the ``regex`` module with a time
limit per match; a pattern that exceeds it is refused with a :class:`~sbn_surgery.errors.RecipeError`
instead of hanging the command. Module paths and model names are short, so an honest pattern
finishes in microseconds and the limit never bites.
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache

import regex

from .errors import RecipeError

__all__ = ["MATCH_TIMEOUT_S", "MAX_PATTERN_CHARS", "check_pattern", "match_pattern"]

#: The longest one regular-expression match may run before the pattern is refused.
MATCH_TIMEOUT_S = 0.25
#: The longest pattern accepted (a module path is rarely over 100 characters).
MAX_PATTERN_CHARS = 1000


@lru_cache(maxsize=512)
def _compiled(pattern: str) -> "regex.Pattern":
    return regex.compile(pattern, flags=regex.VERSION0)


def check_pattern(pattern: str) -> None:
    """Raise ValueError (for pydantic) when ``pattern`` is too long or not a regular expression."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"pattern of {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    if pattern.startswith("re:"):
        try:
            _compiled(pattern[3:])
        except (regex.error, RecursionError, OverflowError) as exc:
            raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None


def match_pattern(pattern: str, text: str) -> bool:
    """``re:<regex>`` (full match) or a glob (``fnmatch``, case-sensitive) on ``text``.

    Raises :class:`RecipeError` when a regular expression runs past :data:`MATCH_TIMEOUT_S`."""
    if not pattern.startswith("re:"):
        return fnmatch.fnmatchcase(text, pattern)
    try:
        return _compiled(pattern[3:]).fullmatch(text, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        raise RecipeError(
            f"recipe pattern {pattern!r} ran past {MATCH_TIMEOUT_S} s on {text!r} (catastrophic "
            "backtracking, e.g. nested quantifiers like (a+)+). Simplify the pattern: one "
            "quantifier per group, or a glob."
        ) from None
