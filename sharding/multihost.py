"""Multi-host: JAX's multi-controller runtime, and the channel that carries each step to every host.

Every process runs the same script.  `initialize()` starts jax.distributed (from arguments, the
JAXENGINE_* variables below, or the cluster's own detection on Cloud TPU / SLURM); then every
process loads its shards and compiles the same step.  Process 0 (the driver) runs the scheduler;
for each step it broadcasts a fixed-size header and the packed batch to the other processes
(the workers), and all processes call the compiled step together, each on its own devices.

Failure: jax.distributed's coordination service watches heartbeats; when a host dies (or hangs)
for heartbeat_timeout_seconds, the surviving processes are stopped with an error naming the
missing task, instead of waiting forever inside a collective.  initialize() itself gives up after
initialization_timeout_s when a host never shows up.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "JAXENGINE_COORDINATOR_ADDRESS"  # "host:port" of process 0
ENV_NUM_PROCESSES = "JAXENGINE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXENGINE_PROCESS_ID"
ENV_MULTIHOST = "JAXENGINE_MULTIHOST"  # "1": initialize with the cluster's auto-detection (TPU pods)
ENV_HEARTBEAT_S = "JAXENGINE_HEARTBEAT_TIMEOUT_S"

OP_STOP, OP_STEP, OP_LOAD_HISTORY, OP_MULTI_STEP = 0, 1, 2, 3
HEADER_SIZE = 4


def requested() -> bool:
    return bool(os.environ.get(ENV_COORDINATOR) or os.environ.get(ENV_MULTIHOST) == "1")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, initialization_timeout_s: int = 300,
               heartbeat_timeout_s: int | None = None) -> None:
    """Start jax.distributed once (no-op when it already runs or nothing asks for it).

    Must run before anything touches a jax device.  On CPU, cross-process collectives go through
    gloo (tests and CPU clusters)."""
    import jax

    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = int(os.environ.get(ENV_HEARTBEAT_S, "60"))
    if jax.distributed.is_initialized():
        return
    if coordinator_address is None and os.environ.get(ENV_MULTIHOST) != "1":
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=initialization_timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize failed (coordinator {coordinator_address}, "
                           f"process {process_id} of {num_processes}): {e}.  Every process must start "
                           "within the timeout and reach the coordinator; initialize must run before "
                           "any other jax call") from e
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())


def is_driver() -> bool:
    import jax

    return jax.process_index() == 0


class StepChannel:
    """Process 0 -> all: a fixed-size int32 header, then the payload whose size the header implies.
    Each message is one broadcast_one_to_all (an XLA collective over every device)."""

    def __init__(self):
        import jax

        self.is_driver = jax.process_index() == 0

    def _broadcast(self, array: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(array, is_source=self.is_driver))

    def send(self, op: int, a: int = 0, b: int = 0, c: int = 0, *payload: np.ndarray) -> None:
        assert self.is_driver
        self._broadcast(np.asarray([op, a, b, c], np.int32))
        for arr in payload:
            self._broadcast(arr)

    def recv_header(self) -> tuple[int, int, int, int]:
        h = self._broadcast(np.zeros((HEADER_SIZE,), np.int32))
        return int(h[0]), int(h[1]), int(h[2]), int(h[3])

    def recv(self, like: np.ndarray) -> np.ndarray:
        return self._broadcast(np.zeros_like(like))


def follow(runner: Any) -> int:
    """The worker loop: replay the driver's device calls until it says stop; returns steps run."""
    channel = runner.channel
    steps = 0
    while True:
        op, t, s, mode = channel.recv_header()
        if op == OP_STOP:
            return steps
        if op == OP_STEP:
            _, n_int, n_float = runner._layout(t, s)
            ints = channel.recv(np.empty((n_int,), np.int32))
            floats = channel.recv(np.empty((n_float,), np.float32))
            runner._dispatch(ints, floats, t, s, mode)
            steps += 1
        elif op == OP_MULTI_STEP:  # header: t, s, num_steps * len(MODES) + sampler mode
            from jaxengine.runner.sampler import MODES
            _, n_int, n_float = runner._layout(t, s)
            ints = channel.recv(np.empty((n_int,), np.int32))
            floats = channel.recv(np.empty((n_float,), np.float32))
            runner._dispatch_multi_step(ints, floats, t, s, mode // len(MODES), mode % len(MODES))
            steps += 1
        elif op == OP_LOAD_HISTORY:
            slot, prompt_len = t, s
            tokens = channel.recv(np.empty((runner.cfg.scheduler.max_model_len,), np.int32))
            runner._dispatch_load_history(slot, tokens, prompt_len)
        else:
            raise RuntimeError(f"unknown multi-host op {op} from process 0")
