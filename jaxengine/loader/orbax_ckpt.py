"""Orbax checkpoints of converted params: `jaxengine convert` writes them, LLM(model=DIR) reads them.

Layout of a converted directory:
    DIR/jaxengine_orbax.json   marker: {"format": "orbax", "dtype": ..., "tensor_parallel_size": ...}
    DIR/params/                orbax StandardCheckpointer tree, keys mirroring the HF names
    DIR/config.json, generation_config.json, tokenizer files   copied from the source

Params are saved with the checkpoint's own shapes (kv heads not duplicated), so one converted
directory serves any tensor_parallel_size.  Restore reads every array straight into its
NamedSharding: each process reads only the slices its devices hold (orbax/tensorstore), no host
materialises a whole tensor, and there is no per-tensor dtype conversion pass in Python.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

MARKER = "jaxengine_orbax.json"
PARAMS_DIR = "params"


def is_orbax_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MARKER))


def read_marker(path: str) -> dict[str, Any]:
    with open(os.path.join(path, MARKER)) as f:
        return json.load(f)


def _storage_sharding(mesh: Any, name: str, shape: tuple[int, ...]) -> Any:
    """The sharding a param is saved from / restored into before any kv-head duplication."""
    from jaxengine import sharding

    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        return sharding.param_sharding(mesh, name, shape)
    except ValueError:  # e.g. 1 kv head on tp=4: restored replicated, duplicated below
        return sharding.replicated(mesh)


def save_params(params: Any, out_dir: str, meta: dict[str, Any]) -> None:
    """Write `params` (a nested dict of jax.Array) as an orbax tree under out_dir/params + the marker.
    Every process must call this (multi-host: each writes its shards)."""
    import orbax.checkpoint as ocp

    os.makedirs(out_dir, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(os.path.join(out_dir, PARAMS_DIR)), params, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, MARKER), "w") as f:
            json.dump({"format": "orbax", **meta}, f, indent=2)
            f.write("\n")


def restore_params(path: str, shapes: dict[str, tuple[int, ...]], cfg: Any, mesh: Any = None) -> Any:
    """Restore the params of a converted dir into their shardings (mesh None: the default device).

    shapes: checkpoint name -> shape (module.param_shapes(cfg)); cfg: the ModelConfig (its dtype
    wins: orbax casts on read when the saved dtype differs)."""
    import orbax.checkpoint as ocp

    from jaxengine import sharding
    from jaxengine.models.llama import unflatten

    dtype = jnp.dtype(cfg.dtype)
    target = unflatten({n: jax.ShapeDtypeStruct(tuple(s), dtype, sharding=_storage_sharding(mesh, n, tuple(s)))
                        for n, s in shapes.items()})
    ckpt_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    try:
        params = ocp.StandardCheckpointer().restore(ckpt_dir, target)
    except (ValueError, KeyError) as e:
        raise ValueError(f"orbax checkpoint {ckpt_dir!r} does not match the model in its config.json: {e}") from e
    if mesh is None:
        return params
    tp = mesh.shape["tp"]
    r = sharding.kv_replicas(cfg, tp)
    if r == 1:
        return params
    flat = sharding.flatten(params)
    for name, arr in flat.items():
        if sharding.is_kv_proj(name):  # duplicate kv heads on device, straight into the sharded layout
            out = sharding.param_sharding(mesh, name, (arr.shape[0] * r,) + tuple(arr.shape[1:]))
            flat[name] = jax.jit(lambda a: sharding.expand_kv(name, a, r, cfg.head_dim),
                                 out_shardings=out)(arr)
    return unflatten(flat)
