"""The device mesh: axes ("dp", "tp") over the devices of every process.

tp (tensor parallel) splits each layer's heads and MLP columns over devices that talk every layer
(fast interconnect: ICI on TPU, NVLink on GPU); dp (data parallel) holds independent model
replicas, one per mesh row, that never talk.  The tp axis is the minor (fastest-varying) one, so
on a multi-host slice a tp group lands on neighbouring devices (one host where it fits).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("dp", "tp")


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("dp", "tp") mesh of tp * dp devices.

    devices: the devices to use, all of them (default: every device of every process; in a single
    process a smaller mesh takes the first tp * dp devices, so tp=2 runs on an 8-device host).
    """
    tp, dp = int(tensor_parallel_size), int(data_parallel_size)
    if tp < 1 or dp < 1:
        raise ValueError(f"tensor_parallel_size and data_parallel_size must be >= 1, got tp={tp}, dp={dp}")
    need = tp * dp
    if devices is not None:
        devices = list(devices)
        if len(devices) != need:
            raise ValueError(f"tensor_parallel_size * data_parallel_size = {tp} * {dp} = {need} must equal "
                             f"the number of devices given ({len(devices)})")
    else:
        available = jax.devices()
        if need > len(available):
            raise ValueError(f"tensor_parallel_size * data_parallel_size = {tp} * {dp} = {need} devices "
                             f"asked for, but only {len(available)} {available[0].platform} device(s) exist"
                             + (f" over {jax.process_count()} processes" if jax.process_count() > 1 else ""))
        if jax.process_count() > 1 and need != len(available):
            # A process whose devices are outside the mesh would have nothing to run and hang the others.
            raise ValueError(f"on {jax.process_count()} processes the mesh must use every device: "
                             f"tensor_parallel_size * data_parallel_size = {need}, but there are "
                             f"{len(available)} devices")
        devices = available[:need]
    if need == len(jax.devices()) and need > 1:
        try:  # topology-aware order on TPU (tp groups on ICI neighbours); plain order elsewhere
            from jax.experimental import mesh_utils
            grid = mesh_utils.create_device_mesh((dp, tp), devices=devices)
            return Mesh(grid, AXES)
        except Exception:  # noqa: BLE001 - fall back to the given order
            pass
    return Mesh(np.asarray(devices, dtype=object).reshape(dp, tp), AXES)


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One ("dp"=1, "tp") sub-mesh per data-parallel replica (a row of the mesh)."""
    return [Mesh(mesh.devices[i:i + 1, :], AXES) for i in range(mesh.devices.shape[0])]
