"""Counts XLA lowerings, so tests (and the engine's own log) can prove serving never compiles."""

from __future__ import annotations

import threading

from jax import monitoring

# Fired once per new program lowered to MLIR, whether or not the persistent cache then has it.
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "persistent_cache_hits",
                 "/jax/compilation_cache/cache_misses": "persistent_cache_misses"}

_lock = threading.Lock()
_count = 0
_background_count = 0  # lowered by a background compile thread (not serving's)
_thread = threading.local()
_cache_stats = {"persistent_cache_hits": 0, "persistent_cache_misses": 0}
_installed = False
_names: list[str] = []  # the programs lowered outside background threads, in order (the last 4096)


def _listener(event: str, duration_secs: float, **kwargs) -> None:
    global _count, _background_count
    if event == _LOWER_EVENT:
        with _lock:
            if getattr(_thread, "background", False):
                _background_count += 1
            else:
                _count += 1
                _names.append(str(kwargs.get("fun_name", "")))
                del _names[:-4096]


def mark_background_thread() -> None:
    """Lowerings by the calling thread from now on are a background compile's (ModelRunner's
    bigger buckets after warm-up): counted by `num_background_compilations`, not by
    `num_compilations` / CompileCounter, which tell whether serving compiled."""
    _thread.background = True


def num_background_compilations() -> int:
    return _background_count


def _event_listener(event: str, **kwargs) -> None:
    key = _CACHE_EVENTS.get(event)
    if key is not None:
        with _lock:
            _cache_stats[key] += 1


def persistent_cache_stats() -> dict[str, int]:
    """Hits and misses of JAX's persistent compilation cache in this process."""
    return dict(_cache_stats)


def lowered_names() -> list[str]:
    """The names of the programs lowered (not by a background thread) in this process, in order:
    the warm-up lowers them in one fixed order, which keeps the persistent cache's keys stable."""
    with _lock:
        return list(_names)


def num_compilations() -> int:
    """Programs lowered in this process since the first CompileCounter was made."""
    return _count


class CompileCounter:
    """`since()` tells how many programs were lowered after `mark()`."""

    def __init__(self):
        global _installed
        with _lock:
            if not _installed:
                monitoring.register_event_duration_secs_listener(_listener)
                monitoring.register_event_listener(_event_listener)
                _installed = True
        self._mark = _count

    def mark(self) -> None:
        self._mark = _count

    def since(self) -> int:
        return _count - self._mark
