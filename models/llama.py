"""The Llama family as pure functions over a params pytree.

Covers Llama 2/3/3.1/3.2 (rope_scaling "llama3"), Mistral, Qwen2/2.5 (bias on q/k/v) and Qwen3
(RMSNorm on q and k per head).  Params are a nested dict whose keys mirror the checkpoint's tensor
names ("model.layers.3.self_attn.q_proj.weight" is params["model"]["layers"]["3"]["self_attn"]
["q_proj"]["weight"]); weights keep Hugging Face's [out_features, in_features] orientation.

forward(params, cfg, batch, kv_caches, attention) runs one ragged step: the flat tokens of every
scheduled request, writing their K/V into the paged cache and returning logits only at the rows
the sampler needs (batch["logits_indices"]).

Two params layouts run through the same forward (LAYOUTS): "hf", the checkpoint's tensors as
they are, and "fused", where each layer's q/k/v projections are one tensor "qkv_proj"
[num_kv_heads, group + 2, head_dim, hidden] (per kv head: its group of q heads, then k, then v)
and gate/up one tensor "gate_up_proj" [2, intermediate, hidden].  fuse_layer_weights makes the
second from the first.  One GEMM per group instead of three and two: at decode XLA otherwise
runs k/v as a reduction kernel beside the q GEMM and reads the RMSNorm output twice (H100 8B
batch 1: 19 kernels a layer).  Both layouts split by kv head / intermediate column under tensor
parallelism (sharding/rules.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxengine.config import ModelConfig
from jaxengine.pallas_kernels.ragged_paged_attention import write_kv
from jaxengine.pallas_kernels.ragged_paged_attention.decode import apply_rope, rope_cos_sin, split_qkv
from jaxengine.pallas_kernels.residual_norm.reference import rms_norm  # as Hugging Face: float32, cast, scale

Params = dict[str, Any]


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must provide, by its Hugging Face name."""
    h, d, hq, hkv, f = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (hq * d, h),
            p + "self_attn.k_proj.weight": (hkv * d, h),
            p + "self_attn.v_proj.weight": (hkv * d, h),
            p + "self_attn.o_proj.weight": (h, hq * d),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (hq * d,), p + "self_attn.k_proj.bias": (hkv * d,),
                           p + "self_attn.v_proj.bias": (hkv * d,)})
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (f,), p + "mlp.up_proj.bias": (f,),
                           p + "mlp.down_proj.bias": (h,)})
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array, scale: float = 0.02) -> Params:
    """Random params of the right shapes (benchmarks and tests)."""
    flat = {}
    names = sorted(param_shapes(cfg).items())
    keys = jax.random.split(key, len(names))
    for k, (name, shape) in zip(keys, names):
        if name.endswith("norm.weight"):
            flat[name] = jnp.ones(shape, cfg.dtype)
        elif name.endswith(".bias"):
            flat[name] = jnp.zeros(shape, cfg.dtype)
        else:
            flat[name] = (scale * jax.random.normal(k, shape, jnp.float32)).astype(cfg.dtype)
    return unflatten(flat)


LAYOUTS = ("hf", "fused")


def fuse_layer_weights(layer: Params, cfg: ModelConfig) -> Params:
    """One layer's params from the "hf" layout to the "fused" layout (jittable, pure)."""
    a, mlp = layer["self_attn"], layer["mlp"]
    n, d = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // n

    def heads(name: str, kind: str, per: int) -> jax.Array:
        w = a[name][kind]
        return w.reshape((n, per, d) + w.shape[1:])

    attn = {k: v for k, v in a.items() if k not in ("q_proj", "k_proj", "v_proj")}
    attn["qkv_proj"] = {kind: jnp.concatenate([heads("q_proj", kind, g), heads("k_proj", kind, 1),
                                               heads("v_proj", kind, 1)], axis=1)
                        for kind in a["q_proj"]}  # weight, and bias where the model has one
    ff = {k: v for k, v in mlp.items() if k not in ("gate_proj", "up_proj")}
    ff["gate_up_proj"] = {kind: jnp.stack([mlp["gate_proj"][kind], mlp["up_proj"][kind]])
                          for kind in mlp["gate_proj"]}
    return {**layer, "self_attn": attn, "mlp": ff}


def layout_of(params: Params) -> str:
    return "fused" if "qkv_proj" in params["model"]["layers"]["0"]["self_attn"] else "hf"


def unflatten(flat: dict[str, Any]) -> Params:
    tree: Params = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# ----------------------------------------------------------------------------------- layers
def dense_einsum(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w [out, in].T: XLA's GEMM.  forward's `dense` replaces it (decode_matmul)."""
    return jnp.einsum("...i,oi->...o", x, w)


def linear(x: jax.Array, p: Params, dense: Callable[..., jax.Array] | None = None) -> jax.Array:
    y = (dense or dense_einsum)(x, p["weight"])
    if "bias" in p:
        y = y + p["bias"]
    return y


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = cfg.rope_scaling_dict
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def attention_block(p: Params, cfg: ModelConfig, x: jax.Array, rope: Any,
                    kv_pages: jax.Array, batch: dict[str, jax.Array],
                    attention: Callable[..., Any], decode: bool = False,
                    dense: Callable[..., jax.Array] | None = None,
                    o_proj: Callable[..., Any] | None = None,
                    l2_prefetch: tuple = ()) -> tuple[Any, jax.Array]:
    """rope: (cos, sin) [num_tokens, head_dim // 2] each, or with decode=True the inv_freq that
    `attention` (a decode_attention, pallas_kernels/ragged_paged_attention/decode.py) rotates
    q and k with itself while it writes the KV slots.  o_proj(out, w): replaces the output
    projection (and its bias: the caller's business), its result returned as is.  l2_prefetch
    (decode only): the attention's window of `l2_windows`, passed on to the decode attention."""
    if o_proj is None:
        o_proj = lambda out, w: linear(out, p["o_proj"], dense)  # noqa: E731
    t = x.shape[0]
    kw = dict(sm_scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window)
    if decode and l2_prefetch:
        kw["l2_prefetch"] = l2_prefetch
    decode_args = (batch["kv_lens"], batch["page_indices"], batch["num_seqs"], rope)
    if "qkv_proj" in p:  # "fused" layout: one GEMM, [num_tokens, num_kv_heads, group + 2, head_dim]
        w = p["qkv_proj"]["weight"]
        # as [num_kv_heads * (group + 2) * head_dim, hidden] (a free reshape): a 2-D x @ w.T, which
        # XLA:CPU runs on the weight as stored; the 4-D einsum made it transpose and copy the whole
        # weight every step (SmolLM2-135M on CPU: 60 such copies, most of a decode step's time)
        qkv = (dense or dense_einsum)(x, w.reshape(-1, w.shape[-1])).reshape(t, *w.shape[:3])
        if "bias" in p["qkv_proj"]:
            qkv = qkv + p["qkv_proj"]["bias"]
        if decode and not cfg.qk_norm:  # the kernel reads q, k and v out of the one buffer
            out, kv_pages = attention(qkv, None, None, kv_pages, *decode_args, **kw)
            return o_proj(out.reshape(t, cfg.num_heads * cfg.head_dim), p["o_proj"]["weight"]), kv_pages
        q, k, v = split_qkv(qkv)
    else:
        q = linear(x, p["q_proj"], dense).reshape(t, cfg.num_heads, cfg.head_dim)  # [num_tokens, num_q_heads, head_dim]
        k = linear(x, p["k_proj"], dense).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = linear(x, p["v_proj"], dense).reshape(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"]["weight"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"]["weight"], cfg.rms_norm_eps)
    if decode:
        out, kv_pages = attention(q, k, v, kv_pages, *decode_args, **kw)
    else:
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv_pages = write_kv(kv_pages, k, v, batch["slot_mapping"])
        out = attention(q, kv_pages, batch["kv_lens"], batch["page_indices"], batch["cu_q_lens"],
                        batch["num_seqs"], **kw)
    return o_proj(out.reshape(t, cfg.num_heads * cfg.head_dim), p["o_proj"]["weight"]), kv_pages


def mlp_block(p: Params, x: jax.Array, dense: Callable[..., jax.Array] | None = None) -> jax.Array:
    if "gate_up_proj" in p:  # "fused" layout
        w = p["gate_up_proj"]["weight"]  # [2, intermediate, hidden]
        gate_up_silu = getattr(dense, "gate_up_silu", None)  # the matmul and SwiGLU as one call
        if gate_up_silu is not None and "bias" not in p["gate_up_proj"]:
            return linear(gate_up_silu(x, w.reshape(-1, w.shape[-1])), p["down_proj"], dense)
        if dense is None:
            # the 3-D einsum keeps a tensor-parallel sharding of the intermediate axis (a
            # [2 * intermediate, hidden] reshape would gather the weight), but XLA:CPU transposes
            # and copies the whole weight for it every step: unsharded runners pass `dense`
            # (dense_einsum at least) and take the 2-D form below
            gu = jnp.einsum("...i,cfi->...cf", x, w)
        else:  # [2 * intermediate, hidden]: a free reshape, one 2-D x @ w.T
            gu = dense(x, w.reshape(-1, w.shape[-1])).reshape(*x.shape[:-1], *w.shape[:2])
        if "bias" in p["gate_up_proj"]:
            gu = gu + p["gate_up_proj"]["bias"]
        return linear(jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :], p["down_proj"], dense)
    return linear(jax.nn.silu(linear(x, p["gate_proj"], dense)) * linear(x, p["up_proj"], dense),
                  p["down_proj"], dense)


def l2_prefetch_list(layer: Params, dense: Any) -> tuple:
    """The layer's weights a decode step reads after its attention, in the order their GEMMs run (o,
    gate/up, down), each with how many contiguous K ranges its kernel's CTAs walk (dense.k_parts;
    1 without one): the stream pallas_kernels/l2_prefetch plans L2 prefetches over."""
    k_parts = getattr(dense, "k_parts", None)
    a, mlp = layer["self_attn"], layer["mlp"]
    ws = [(a["o_proj"]["weight"], False)]
    if "gate_up_proj" in mlp:
        w = mlp["gate_up_proj"]["weight"]
        ws.append((w.reshape(-1, w.shape[-1]), True))
    else:
        ws += [(mlp["gate_proj"]["weight"], False), (mlp["up_proj"]["weight"], False)]
    ws.append((mlp["down_proj"]["weight"], False))
    return tuple((w, k_parts(w.shape[0], w.shape[-1], gate_up=g) if k_parts else 1) for w, g in ws)


def l2_windows(layer: Params, attention: Any, dense: Any, decode: bool, rows: int, gemm: bool) -> dict:
    """What the layer's kernels read into L2 for the GEMMs after them ({"qkv" | "attention" | "o":
    ((weight, region), ...)}, pallas_kernels/l2_prefetch.windows; empty unless
    $JAXENGINE_L2_PREFETCH asks): planned by a decode attention that can take its share (its
    `l2_windows`: the GPU decode kernel); the q/k/v and o GEMMs' shares only where `gemm` (the
    norm-epilogue loop) and the dense kernels take them (dense.accepts_l2_next)."""
    plan = getattr(attention, "l2_windows", None)
    if not (decode and plan):
        return {}
    return plan(l2_prefetch_list(layer, dense), rows, gemm and getattr(dense, "accepts_l2_next", False))


def _l2_kw(win: dict, name: str) -> dict:
    return {"l2_next": win[name]} if name in win else {}


def fused_layer(layer: Params, cfg: ModelConfig, x: jax.Array, cos: jax.Array, sin: jax.Array,
                kv_pages: jax.Array, batch: dict[str, jax.Array], attention: Callable[..., jax.Array],
                matmul: Any) -> tuple[jax.Array, jax.Array]:
    """One decoder layer with fused matmuls (pallas_kernels/fused_matmul): the RMSNorms ride in
    the q/k/v and gate/up kernels, SwiGLU in the gate/up kernel, the residual adds in the o and
    down kernels.  Same numerics as the unfused layer up to float32 summation order."""
    a, mlp, eps, t = layer["self_attn"], layer["mlp"], cfg.rms_norm_eps, x.shape[0]
    q, k, v = matmul.norm_linear(x, layer["input_layernorm"]["weight"], eps,
                                 [a[n]["weight"] for n in ("q_proj", "k_proj", "v_proj")])
    if cfg.qkv_bias:
        q, k, v = q + a["q_proj"]["bias"], k + a["k_proj"]["bias"], v + a["v_proj"]["bias"]
    q = q.reshape(t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, a["q_norm"]["weight"], eps)
        k = rms_norm(k, a["k_norm"]["weight"], eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    kv_pages = write_kv(kv_pages, k, v, batch["slot_mapping"])
    out = attention(q, kv_pages, batch["kv_lens"], batch["page_indices"], batch["cu_q_lens"],
                    batch["num_seqs"], sm_scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window)
    out = out.reshape(t, cfg.num_heads * cfg.head_dim)
    if cfg.o_bias:
        x = x + linear(out, a["o_proj"])
    else:
        x = matmul.linear_residual(out, a["o_proj"]["weight"], x)
    if cfg.mlp_bias:
        return x + mlp_block(mlp, rms_norm(x, layer["post_attention_layernorm"]["weight"], eps)), kv_pages
    h = matmul.norm_gate_up(x, layer["post_attention_layernorm"]["weight"], eps,
                            mlp["gate_proj"]["weight"], mlp["up_proj"]["weight"])
    return matmul.linear_residual(h, mlp["down_proj"]["weight"], x), kv_pages


def fusable(cfg: ModelConfig, multiple: int = 16) -> bool:
    """Whether the fused-matmul kernels tile this model's shapes (every dimension a multiple of 16)."""
    dims = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim)
    return all(d % multiple == 0 for d in dims)


def forward(params: Params, cfg: ModelConfig, batch: dict[str, jax.Array], kv_caches: list[jax.Array],
            attention: Callable[..., jax.Array], matmul: Any = None,
            decode_attention: Callable[..., Any] | None = None,
            residual_norm: Callable[..., Any] | None = None,
            dense: Callable[..., jax.Array] | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """One ragged step.  Returns (logits [num_logits, vocab] float32, updated kv_caches).

    matmul: None (XLA's matmuls and elementwise fusions) or a fused-matmul namespace
    (pallas_kernels.fused_matmul.get_matmul): the runner passes one for decode-sized buckets.
    decode_attention: for a decode-only step (token row j is request j, at position
    kv_lens[j] - 1), an implementation of ragged_paged_attention/decode.py that rotates q/k and
    writes the KV slots itself; it replaces `attention`, the rope and the KV scatter.
    residual_norm: an implementation of pallas_kernels/residual_norm (residual add + the next
    RMSNorm as one call): each layer then ends with the next layer's input norm (the last with
    the final norm, over every row before the logits rows are gathered: rows are independent).
    dense: the layers' matmuls, dense(x [..., in], w [out, in]) -> x @ w.T (None: XLA's einsum;
    the runner passes pallas_kernels/decode_matmul for decode-sized buckets on request); with a
    `gate_up_silu(x, w [2F, in])` attribute, the fused layout's MLP runs silu(gate) * up through it;
    where its `use_norm_epilogues(rows, hidden)` says so, the residual adds and RMSNorms run in the
    matmuls too, through its `prenorm`, `residual`, `normed` and `normed_gate_up_silu`
    (_forward_norm_in_matmuls; residual_norm unused)."""
    model = params["model"]
    if matmul is not None and (layout_of(params) != "hf" or decode_attention is not None
                               or dense is not None):
        raise ValueError("the fused-matmul kernels take the 'hf' params layout and the general "
                         "attention path, and replace `dense`")
    x = model["embed_tokens"]["weight"][batch["input_ids"]]  # [num_tokens, hidden]
    if decode_attention is not None:
        rope, attention = rope_inv_freq(cfg), decode_attention
    else:
        rope = rope_cos_sin(batch["positions"], rope_inv_freq(cfg))
    norm_rule = getattr(dense, "use_norm_epilogues", None)
    if (matmul is None and norm_rule is not None and norm_rule(x.shape[0], cfg.hidden_size)
            and _norm_in_matmuls(params, cfg)):
        return _forward_norm_in_matmuls(params, cfg, batch, kv_caches, attention, x, rope, dense,
                                        decode=decode_attention is not None)
    if residual_norm is not None and matmul is None:
        return _forward_residual_norm(params, cfg, batch, kv_caches, attention, x, rope, residual_norm,
                                      decode=decode_attention is not None, dense=dense)
    new_caches = []
    for i in range(cfg.num_layers):
        layer = model["layers"][str(i)]
        if matmul is not None:
            x, kv = fused_layer(layer, cfg, x, *rope, kv_caches[i], batch, attention, matmul)
            new_caches.append(kv)
            continue
        decode = decode_attention is not None
        win = l2_windows(layer, attention, dense, decode, x.shape[0], gemm=False)
        h, kv = attention_block(layer["self_attn"], cfg, rms_norm(x, layer["input_layernorm"]["weight"],
                                                                 cfg.rms_norm_eps),
                                rope, kv_caches[i], batch, attention, decode=decode, dense=dense,
                                l2_prefetch=win.get("attention", ()))
        new_caches.append(kv)
        x = x + h
        x = x + mlp_block(layer["mlp"], rms_norm(x, layer["post_attention_layernorm"]["weight"],
                                                 cfg.rms_norm_eps), dense)
    x = rms_norm(x[batch["logits_indices"]], model["norm"]["weight"], cfg.rms_norm_eps)
    return lm_head(params, cfg, x), new_caches


def lm_head(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Logits (float32) of the final-normed rows x."""
    model = params["model"]
    head = model["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]
    return jnp.einsum("sh,vh->sv", x, head, preferred_element_type=jnp.float32)


def _forward_residual_norm(params, cfg, batch, kv_caches, attention, x, rope, residual_norm, *, decode,
                           dense=None):
    """forward's layer loop with each residual add and the RMSNorm after it as one call."""
    model, eps, n = params["model"], cfg.rms_norm_eps, cfg.num_layers
    layers = [model["layers"][str(i)] for i in range(n)]
    _, normed = residual_norm(x, None, layers[0]["input_layernorm"]["weight"], eps)
    new_caches = []
    for i, layer in enumerate(layers):
        win = l2_windows(layer, attention, dense, decode, x.shape[0], gemm=False)
        h, kv = attention_block(layer["self_attn"], cfg, normed, rope, kv_caches[i], batch, attention,
                                decode=decode, dense=dense, l2_prefetch=win.get("attention", ()))
        new_caches.append(kv)
        x, normed = residual_norm(x, h, layer["post_attention_layernorm"]["weight"], eps)
        nxt = layers[i + 1]["input_layernorm"]["weight"] if i + 1 < n else model["norm"]["weight"]
        x, normed = residual_norm(x, mlp_block(layer["mlp"], normed, dense), nxt, eps)
    return lm_head(params, cfg, normed[batch["logits_indices"]]), new_caches


def _norm_in_matmuls(params: Params, cfg: ModelConfig) -> bool:
    """Whether _forward_norm_in_matmuls covers the model: the fused layout, no o/MLP biases (the
    residual kernels add nothing but the residual)."""
    layer = params["model"]["layers"]["0"]
    return ("qkv_proj" in layer["self_attn"] and "gate_up_proj" in layer["mlp"]
            and not cfg.o_bias and not cfg.mlp_bias)


def _forward_norm_in_matmuls(params, cfg, batch, kv_caches, attention, x, rope, dense, *, decode):
    """forward's layer loop with the residual adds and RMSNorms in the matmuls' epilogues: the o
    and down projections return (h, hg, ss) = the residual stream, the next norm's input with its
    weight applied and partial sums of h^2; the q/k/v and gate/up projections take hg and ss and
    scale each row by its 1/rms (pallas_kernels/decode_matmul's norm epilogues)."""
    model, eps, n = params["model"], cfg.rms_norm_eps, cfg.num_layers
    layers = [model["layers"][str(i)] for i in range(n)]
    hg, ss = dense.prenorm(x, layers[0]["input_layernorm"]["weight"])
    new_caches = []
    for i, layer in enumerate(layers):
        post = layer["post_attention_layernorm"]["weight"]
        # the q/k/v GEMM, the attention and the o GEMM each read ahead into L2 on request
        win = l2_windows(layer, attention, dense, decode, x.shape[0], gemm=True)
        qkv_dense = lambda a, w, ss=ss, kw=_l2_kw(win, "qkv"): dense.normed(a, w, ss, eps, **kw)  # noqa: E731
        o_proj = lambda out, w, x=x, post=post, kw=_l2_kw(win, "o"): dense.residual(out, w, x, post, **kw)  # noqa: E731
        (x, hg, ss), kv = attention_block(layer["self_attn"], cfg, hg, rope, kv_caches[i], batch,
                                          attention, decode=decode, dense=qkv_dense, o_proj=o_proj,
                                          l2_prefetch=win.get("attention", ()))
        new_caches.append(kv)
        w = layer["mlp"]["gate_up_proj"]["weight"]
        act = dense.normed_gate_up_silu(hg, w.reshape(-1, w.shape[-1]), ss, eps)
        nxt = layers[i + 1]["input_layernorm"]["weight"] if i + 1 < n else model["norm"]["weight"]
        x, hg, ss = dense.residual(act, layer["mlp"]["down_proj"]["weight"], x, nxt)
    x = rms_norm(x[batch["logits_indices"]], model["norm"]["weight"], eps)
    return lm_head(params, cfg, x), new_caches
