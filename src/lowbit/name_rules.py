"""Which setting applies to a module, by its name: ignore regexes, then (regex, setting) overrides
(first match wins), else the default. One rule for recipes, PTQ and QAT configs."""

from __future__ import annotations

import re
from collections.abc import Iterable

from lowbit.errors import LowbitError


def check_patterns(owner: str, patterns: Iterable[str]) -> None:
    """Every pattern compiles as a regex; else one error naming `owner`."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise LowbitError(f"{owner}: {p!r} is not a valid regex ({e})") from None


def setting_for(name: str, default, ignore: Iterable[str] = (), overrides: Iterable[tuple[str, object]] = (),
                targets: Iterable[str] | None = None):
    """None if `name` is outside `targets` (when given) or matches an ignore regex; else the first
    override whose regex matches, else `default`."""
    if targets is not None and name not in targets:
        return None
    if any(re.search(p, name) for p in ignore):
        return None
    for pattern, setting in overrides:
        if re.search(pattern, name):
            return setting
    return default
