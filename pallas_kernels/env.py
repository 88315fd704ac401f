"""The experiment switches' environment variables, read one way; and which GPU generation runs."""

from __future__ import annotations

import os

import jax


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> str:
    """value, if it is one of `choices`; else a ValueError naming `what` and the choices."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


def env_choice(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    """$name lower-cased and stripped, one of `choices`, or `default` when unset or empty; any
    other value is a ValueError naming the variable and its choices."""
    value = os.environ.get(name, "").strip().lower()
    return check_choice(name, value, choices) if value else default


def hopper() -> bool:
    """Whether the default device is an NVIDIA Hopper GPU (compute capability 9.x: wgmma + TMA)."""
    if jax.default_backend() not in ("gpu", "cuda"):
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")).split(".")[0] == "9"
