"""Partition rules: Hugging Face param name -> PartitionSpec over the "tp" mesh axis.

Megatron layout, weights in Hugging Face's [out_features, in_features] orientation:
  column-parallel  q/k/v/gate/up_proj.weight  P("tp", None)  (and q/k/v biases P("tp")): each
                   device computes its own heads / MLP columns, no communication;
  row-parallel     o_proj/down_proj.weight    P(None, "tp"): each device multiplies its slice of
                   the heads / columns and XLA sums the partial results with one all-reduce;
  vocab-parallel   embed_tokens, lm_head      P("tp", None): a gather plus an all-reduce for the
                   embedding, an all-gather of the [num_seqs, vocab] logits for the sampler;
  replicated       every norm (input/post-attention/final, q_norm/k_norm).
So a layer costs exactly two all-reduces of [num_tokens, hidden].

KV heads.  The KV cache [num_pages, page_size, 2 * num_kv_heads, head_dim] is sharded on its
combined head axis; K and V of head h sit at 2h and 2h + 1, so a contiguous split keeps them
together.  When a model has fewer kv heads than tp (GQA: Llama-3 8B has 8, tp=16; MQA has 1), each
kv head is duplicated tp / num_kv_heads times, in the k/v projection weights at load time and so in
the cache: the model then runs with num_kv_heads = tp, every device holds exactly the kv head its
q heads read, and attention stays local.  The price is tp / num_kv_heads times the KV memory per
token (as vLLM, which replicates kv heads the same way).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

logger = logging.getLogger(__name__)

TP = "tp"

# (regex on the flat HF name, spec); first match wins.
RULES: tuple[tuple[str, P], ...] = (
    (r"(^|\.)embed_tokens\.weight$", P(TP, None)),
    (r"(^|\.)lm_head\.weight$", P(TP, None)),
    (r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", P(TP, None)),
    (r"\.(q_proj|k_proj|v_proj)\.bias$", P(TP)),
    # "fused" layout (models/llama.py): qkv_proj [kv heads, group + 2, head_dim, hidden] split by kv
    # head, gate_up_proj [2, intermediate, hidden] by intermediate column: the same split as above
    (r"\.qkv_proj\.weight$", P(TP, None, None, None)),
    (r"\.qkv_proj\.bias$", P(TP, None, None)),
    (r"\.gate_up_proj\.weight$", P(None, TP, None)),
    (r"\.gate_up_proj\.bias$", P(None, TP)),
    (r"\.(o_proj|down_proj)\.weight$", P(None, TP)),
    (r"norm\.weight$", P()),
)


def partition_spec(name: str, shape: tuple[int, ...] | None = None, tp: int | None = None) -> P:
    """The PartitionSpec of param `name`.  With shape and tp given, a vocab that tp does not divide
    falls back to a replicated embedding / lm_head (the only dimension we do not validate upfront)."""
    for pattern, spec in RULES:
        if re.search(pattern, name):
            if shape is not None and tp is not None and tp > 1:
                for dim, axis in zip(shape, spec):
                    if axis == TP and dim % tp:
                        if "embed_tokens" in name or "lm_head" in name:
                            logger.warning("vocab size %d is not divisible by tp=%d: %s is replicated",
                                           dim, tp, name)
                            return P()
                        raise ValueError(f"{name} has shape {shape}: dimension {dim} is not divisible by "
                                         f"tensor_parallel_size {tp}")
            return spec
    logger.debug("no partition rule for %s: replicated", name)
    return P()


def check_model(cfg: Any, tp: int) -> None:
    """ValueError when the model cannot be split tp ways (cfg: a ModelConfig)."""
    if tp == 1:
        return
    if cfg.num_heads % tp:
        raise ValueError(f"num_attention_heads ({cfg.num_heads}) must be divisible by "
                         f"tensor_parallel_size ({tp})")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ValueError(f"num_key_value_heads ({cfg.num_kv_heads}) and tensor_parallel_size ({tp}) must "
                         "divide one another (kv heads are split when there are more, duplicated when fewer)")
    if cfg.intermediate_size % tp:
        raise ValueError(f"intermediate_size ({cfg.intermediate_size}) must be divisible by "
                         f"tensor_parallel_size ({tp})")


def kv_replicas(cfg: Any, tp: int) -> int:
    """How many copies of each kv head the sharded model holds (1 unless num_kv_heads < tp)."""
    return max(tp // cfg.num_kv_heads, 1)


def sharded_model_config(cfg: Any, tp: int) -> Any:
    """The ModelConfig the sharded step runs: num_kv_heads raised to tp when kv heads are duplicated."""
    check_model(cfg, tp)
    r = kv_replicas(cfg, tp)
    return cfg if r == 1 else dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * r)


def is_kv_proj(name: str) -> bool:
    return re.search(r"\.(k_proj|v_proj)\.(weight|bias)$", name) is not None


def expand_kv(name: str, array: Any, replicas: int, head_dim: int) -> Any:
    """Duplicate each kv head of a k/v projection `replicas` times (consecutively: expanded head e is
    original head e // replicas, so q head i still meets kv head i // group).  Works on numpy and jax."""
    if replicas == 1 or not is_kv_proj(name):
        return array
    xp = jnp if isinstance(array, jax.Array) else np
    heads = array.shape[0] // head_dim
    a = array.reshape((heads, head_dim) + tuple(array.shape[1:]))
    a = xp.repeat(a, replicas, axis=0)
    return a.reshape((heads * replicas * head_dim,) + tuple(array.shape[1:]))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def param_sharding(mesh: Mesh, name: str, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(name, tuple(shape), mesh.shape[TP]))


def param_shardings(mesh: Mesh, shapes: dict[str, tuple[int, ...]]) -> dict[str, NamedSharding]:
    """flat name -> NamedSharding for the (already kv-expanded) shapes."""
    return {name: param_sharding(mesh, name, shape) for name, shape in shapes.items()}


def sharded_param_shapes(cfg: Any, shapes: dict[str, tuple[int, ...]], tp: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint shapes -> the shapes the sharded model holds (k/v projections kv-expanded)."""
    r = kv_replicas(cfg, tp)
    return {n: ((s[0] * r,) + tuple(s[1:]) if r > 1 and is_kv_proj(n) else tuple(s)) for n, s in shapes.items()}


def put_array(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array into `sharding`: each process hands its own devices only their slices (works
    across processes, where jax.device_put of a global sharding would not)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def make_put(mesh: Mesh, cfg: Any) -> Callable[[str, np.ndarray], jax.Array]:
    """The `put` callback of loader.checkpoint.load_params: one tensor straight into its sharding."""
    tp = mesh.shape[TP]
    r = kv_replicas(cfg, tp)

    def put(name: str, array: np.ndarray) -> jax.Array:
        array = expand_kv(name, array, r, cfg.head_dim)
        return put_array(np.asarray(array), param_sharding(mesh, name, array.shape))

    return put


def shard_params(params: Any, mesh: Mesh, cfg: Any) -> Any:
    """Move an existing (e.g. randomly initialised, single-device) params tree onto the mesh."""
    from jaxengine.models.llama import unflatten

    put = make_put(mesh, cfg)
    return unflatten({n: put(n, np.asarray(jax.device_get(a))) for n, a in flatten(params).items()})


def map_layers(params: Any, fn: Callable[[Any], Any], mesh: Mesh | None = None) -> Any:
    """Apply fn to every decoder layer (params["model"]["layers"][i]) in place, one jitted call per
    layer, each result placed by the partition rules on `mesh` (or on the default device); returns
    params.

    In place on purpose: each old layer is dropped as soon as its replacement is made, so when the
    caller holds no other reference to it (LLM() converting what it has just loaded) peak device
    memory grows by one layer, not by the model."""
    layers = params["model"]["layers"]
    step = None
    for i in sorted(layers, key=int):
        if step is None:
            out_sh = None
            if mesh is not None:  # the rules match full names: place the layer where it will live
                tree = {"model": {"layers": {i: jax.eval_shape(fn, layers[i])}}}
                out_sh = params_sharding_tree(tree, mesh)["model"]["layers"][i]
            step = jax.jit(fn, out_shardings=out_sh)
        layers[i] = step(layers[i])
    return params


def params_sharding_tree(params: Any, mesh: Mesh) -> Any:
    """A pytree of NamedShardings matching `params` (kv-expanded shapes)."""
    from jaxengine.models.llama import unflatten

    return unflatten({n: param_sharding(mesh, n, a.shape) for n, a in flatten(params).items()})


# ------------------------------------------------------------------------------------ KV cache
def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """[num_pages, page_size, 2 * num_kv_heads, head_dim]: split on the combined head axis."""
    return NamedSharding(mesh, P(None, None, TP, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def zeros(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> jax.Array:
    """A sharded zero array born on its devices (no host copy, works across processes)."""
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)()


# ----------------------------------------------------------------------------------- attention
def shard_attention(attention: Callable[..., jax.Array], mesh: Mesh) -> Callable[..., jax.Array]:
    """Run `attention` under shard_map over tp with heads local: each device sees its q heads
    [num_tokens, num_q_heads / tp, head_dim] and its kv pages [.., 2 * num_kv_heads / tp, ..], the
    same program the single-device path runs (which is what lets Pallas kernels run sharded)."""
    if mesh.shape[TP] == 1:
        return attention

    def sharded(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, **kwargs):
        f = functools.partial(attention, **kwargs)
        return jax.shard_map(
            f, mesh=mesh,
            in_specs=(P(None, TP, None), P(None, None, TP, None), P(), P(), P(), P()),
            out_specs=P(None, TP, None), check_vma=False,
        )(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)

    return sharded


def shard_decode_attention(decode_attention: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """`shard_attention` for a decode_attention (ragged_paged_attention/decode.py): q, k, v split
    by head, the pages by kv head, and the updated pages come back split the same way."""
    if mesh.shape[TP] == 1:
        return decode_attention
    heads, pages = P(None, TP, None), P(None, None, TP, None)

    def sharded(q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq, **kwargs):
        if k is None:  # fused q/k/v [num_tokens, num_kv_heads, group + 2, head_dim]: split by kv head
            def f(qkv, *rest):
                return decode_attention(qkv, None, None, *rest, **kwargs)
            return jax.shard_map(
                f, mesh=mesh, in_specs=(P(None, TP, None, None), pages, P(), P(), P(), P()),
                out_specs=(heads, pages), check_vma=False,
            )(q, kv_pages, kv_lens, page_indices, num_seqs, inv_freq)
        f = functools.partial(decode_attention, **kwargs)
        return jax.shard_map(
            f, mesh=mesh, in_specs=(heads, heads, heads, pages, P(), P(), P(), P()),
            out_specs=(heads, pages), check_vma=False,
        )(q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq)

    return sharded


def shard_replicated(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """A kernel that takes and returns arrays whole, run on every device of the mesh as is (e.g.
    the residual-norm kernel on the replicated activations): a Pallas call has no SPMD
    partitioning rule of its own, so it goes inside a shard_map with replicated specs.  Positional
    arguments that are not arrays (None, Python numbers) stay static."""
    def sharded(*args, **kwargs):
        present = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]

        def f(*xs):
            full = list(args)
            for i, x in zip(present, xs):
                full[i] = x
            return fn(*full, **kwargs)

        xs = [args[i] for i in present]
        out = jax.eval_shape(f, *xs)
        return jax.shard_map(f, mesh=mesh, in_specs=tuple(P() for _ in xs),
                             out_specs=jax.tree.map(lambda _: P(), out), check_vma=False)(*xs)

    return sharded


def replica_params(params: Any, sub_mesh: Mesh) -> Any:
    """The params of one data-parallel replica, as arrays on its sub-mesh (a row of the full mesh).

    Params on the full ("dp", "tp") mesh are replicated over dp, so the row's devices already hold
    a full copy: this only re-labels those device buffers (no copy, no transfer)."""
    devices = set(sub_mesh.devices.flat)

    def take(a: jax.Array) -> jax.Array:
        spec = a.sharding.spec
        shards = [s.data for s in a.addressable_shards if s.device in devices]
        return jax.make_array_from_single_device_arrays(a.shape, NamedSharding(sub_mesh, spec), shards)

    return jax.tree.map(take, params)


def vocab_sharding(mesh: Mesh) -> NamedSharding:
    """[num_seqs, vocab] logits as the vocab-parallel lm_head makes them."""
    return NamedSharding(mesh, P(None, TP))
