"""The experiment switches' environment variables, read one way."""

from __future__ import annotations

import os


def env_choice(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    """$name lower-cased and stripped, one of `choices`, or `default` when unset or empty; any
    other value is a ValueError naming the variable and its choices."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value
