"""Mosaic GPU decode matmul (pallas_kernels/decode_matmul) against its jnp reference: random x and
w, token rows 1-64 (padded to wgmma's multiple of 8 inside), one or several K splits, tile and
pipeline depths, bf16 and f16; in Mosaic GPU's interpreter on CPU, compiled on a Hopper GPU."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxengine.pallas_kernels.decode_matmul import gpu as dm_gpu
from jaxengine.pallas_kernels.decode_matmul import reference, reference_decode_matmul

BACKEND = jax.default_backend()


@pytest.fixture(autouse=True)
def _interpreter_callbacks_done():
    """Mosaic GPU's interpreter runs kernels as io_callbacks that dispatch jax ops themselves; one
    still cleaning up (its barriers) while the next test dispatches eagerly deadlocked the 2-core
    CI once.  Wait for every pending callback before and after each test."""
    jax.effects_barrier()
    yield
    jax.effects_barrier()
INTERPRET = BACKEND != "gpu"
if BACKEND == "gpu" and "H100" not in jax.devices()[0].device_kind and "H200" not in jax.devices()[0].device_kind:
    pytest.skip("wgmma kernels need a Hopper GPU", allow_module_level=True)


@pytest.mark.parametrize("m,n,k,cfg", [
    (1, 64, 128, dict(tile_k=64, splits=1, stages=2)),
    (1, 192, 512, {}),  # default config
    (5, 128, 512, dict(tile_k=128, splits=2, stages=4)),
    (8, 64, 384, dict(tile_k=64, splits=3, stages=3)),
    (13, 256, 256, dict(tile_k=64, splits=4, stages=2)),
    (64, 128, 1024, dict(tile_k=256, splits=2, stages=2)),
    (37, 64, 128, dict(tile_k=128, splits=1, stages=4)),
    (3, 128, 512, dict(tile_k=128, splits=2, stages=3, warp_specialized=True)),
    (64, 64, 256, dict(tile_k=64, splits=1, stages=2, warp_specialized=True)),
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_kernel_matches_reference(m, n, k, cfg, dtype):
    seed = m * 1000 + n + k + (dtype == jnp.float16)
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (n, k), jnp.float32) * 0.05).astype(dtype)
    got = dm_gpu.decode_matmul(x, w, interpret=INTERPRET, **cfg)
    jax.effects_barrier()  # the interpreter's callbacks finish before the next eager op
    want = reference_decode_matmul(x, w)
    assert got.shape == (m, n) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))


@pytest.mark.parametrize("m,f,k,cfg", [(1, 128, 256, {}), (8, 64, 128, dict(tile_k=64, stages=2)),
                                       (13, 192, 384, dict(tile_k=128, stages=3)), (64, 64, 256, {})])
def test_gate_up_silu_matches_reference(m, f, k, cfg):
    kx, kw = jax.random.split(jax.random.key(m + f + k))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (2 * f, k), jnp.float32) * 0.1).astype(jnp.bfloat16)
    got = dm_gpu.decode_gate_up_silu(x, w, interpret=INTERPRET, **cfg)
    jax.effects_barrier()
    gu = jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32)
    want = jax.nn.silu(gu[:, :f]) * gu[:, f:]
    assert got.shape == (m, f) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2e-2,
                               atol=2e-2 * float(jnp.max(jnp.abs(want))))
    with pytest.raises(ValueError, match="2F"):
        dm_gpu.decode_gate_up_silu(x, w[:2 * f - 64], interpret=INTERPRET)


def _normal(key, shape, scale=1.0, shift=0.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale + shift).astype(jnp.bfloat16)


def _close(got, want, tol=2e-2):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))


@pytest.mark.parametrize("m,n,k,splits", [(1, 128, 256, 1), (8, 64, 128, 1), (13, 192, 256, 1),
                                          (64, 128, 256, 1), (5, 128, 256, 2)])
def test_residual_kernel_matches_reference(m, n, k, splits):
    """o / down with the residual add and the next norm's inputs in the epilogue (splits = 1), or
    in XLA's split-K reduction (splits = 2): h, hg and the partial sums of squares."""
    kx, kw, kr, kg = jax.random.split(jax.random.key(m * 7 + n + k + splits), 4)
    x, w = _normal(kx, (m, k)), _normal(kw, (n, k), 0.05)
    res, g = _normal(kr, (m, n)), _normal(kg, (n,), 0.1, 1.0)
    h, hg, ss = dm_gpu.decode_matmul_residual(x, w, res, g, splits=splits, interpret=INTERPRET)
    jax.effects_barrier()
    want_h, want_hg, want_ss = reference.decode_matmul_residual(x, w, res, g)
    m_pad = -(-m // 8) * 8
    # a two-CTA cluster (the compiled default for two splits) runs the epilogue in the kernel, one
    # partial-sum row per 64-feature block like one split; XLA's split-K sum leaves one row
    clustered = dm_gpu._epilogue_config(m, n, k, None, splits, None, 0, INTERPRET, None)["cluster"]
    assert clustered == (splits == 2 and not INTERPRET and dm_gpu.cluster_split_default())
    assert h.shape == hg.shape == (m, n) and h.dtype == hg.dtype == jnp.bfloat16
    assert ss.shape == ((n // 64 if splits == 1 or clustered else 1), m_pad) and ss.dtype == jnp.float32
    _close(h, want_h)
    _close(hg, want_hg)
    _close(ss.sum(0)[:m], want_ss.sum(0)[:m])
    np.testing.assert_array_equal(np.asarray(ss[:, m:]), 0.0)  # padding rows: no norm contribution


@pytest.mark.parametrize("m,n,k,t,splits,ss_sum", [
    (1, 128, 256, 4, 1, "rows"), (8, 192, 128, 1, 1, "rows"), (13, 64, 256, 64, 1, "rows"),
    (64, 128, 256, 3, 1, "rows"), (5, 128, 256, 2, 2, "rows"),
    (13, 64, 256, 64, 1, "chunks"), (8, 64, 128, 128, 1, "chunks"), (64, 128, 256, 64, 1, "chunks")])
def test_normed_kernel_matches_reference(m, n, k, t, splits, ss_sum, monkeypatch):
    """q/k/v on hg with each row's 1/rms (from t partial sums of squares: row by row, or with
    $JAXENGINE_MGPU_SS_SUM=chunks in 64-row chunks summed across the warpgroup) applied in the
    epilogue."""
    monkeypatch.setenv("JAXENGINE_MGPU_SS_SUM", ss_sum)
    kx, kw, ks = jax.random.split(jax.random.key(m * 5 + n + k + t), 3)
    x, w = _normal(kx, (m, k)), _normal(kw, (n, k), 0.05)
    ss = jax.random.uniform(ks, (t, -(-m // 8) * 8), jnp.float32, 0.1, 4.0) * k
    got = dm_gpu.decode_matmul_normed(x, w, ss, 1e-5, splits=splits, interpret=INTERPRET)
    jax.effects_barrier()
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    _close(got, reference.decode_matmul_normed(x, w, ss, 1e-5))
    with pytest.raises(ValueError, match="ss must be float32"):
        dm_gpu.decode_matmul_normed(x, w, ss[:, :1], 1e-5, interpret=INTERPRET)


@pytest.mark.parametrize("m,f,k,t", [(1, 128, 256, 2), (13, 64, 128, 1), (64, 64, 256, 64)])
def test_normed_gate_up_silu_matches_reference(m, f, k, t, monkeypatch):
    """gate/up + SwiGLU on hg with each row's 1/rms applied to both accumulators first (the
    64-row case with the chunked sum of the sums of squares)."""
    monkeypatch.setenv("JAXENGINE_MGPU_SS_SUM", "chunks")
    kx, kw, ks = jax.random.split(jax.random.key(m + f * 3 + k + t), 3)
    x, w = _normal(kx, (m, k)), _normal(kw, (2 * f, k), 0.1)
    ss = jax.random.uniform(ks, (t, -(-m // 8) * 8), jnp.float32, 0.1, 4.0) * k
    got = dm_gpu.decode_gate_up_silu(x, w, ss=ss, eps=1e-5, interpret=INTERPRET)
    jax.effects_barrier()
    _close(got, reference.decode_gate_up_silu(x, w, ss, 1e-5))


def test_norm_epilogues_compose_to_an_rms_norm():
    """reference contracts: prenorm / residual then normed = rms_norm then matmul (Hugging Face
    numerics up to bf16 rounding), so the kernels' chain computes the model's layer."""
    from jaxengine.models.llama import rms_norm

    kx, kw, kr, kg = jax.random.split(jax.random.key(0), 4)
    x, w, g = _normal(kx, (8, 256)), _normal(kw, (128, 256), 0.05), _normal(kg, (256,), 0.1, 1.0)
    hg, ss = reference.prenorm(x, g)
    _close(reference.decode_matmul_normed(hg, w, ss, 1e-5), reference.decode_matmul(rms_norm(x, g, 1e-5), w))
    res = _normal(kr, (8, 128))
    h, hg2, ss2 = reference.decode_matmul_residual(x, w, res, g[:128])
    _close(reference.decode_matmul_normed(hg2, w[:, :128], ss2, 1e-5),
           reference.decode_matmul(rms_norm(h, g[:128], 1e-5), w[:, :128]))


def test_default_config_fills_the_chip_and_divides_k():
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (2048, 8192), (3072, 2048)]:
        for m in (1, 8, 64):
            cfg = dm_gpu.default_config(m, n, k)
            assert k % (cfg["tile_k"] * cfg["splits"]) == 0
            ctas = n // dm_gpu.TILE_N * cfg["splits"]
            assert ctas >= 60, (n, k, cfg)
            assert cfg["splits"] == 1 or n // dm_gpu.TILE_N < 60  # no reduction where not needed
            assert cfg["stages"] * (64 + -(-m // 8) * 8) * cfg["tile_k"] * 2 <= 200 << 10


@pytest.mark.parametrize("x_shape,w_shape,dtype,match", [
    ((1, 128), (96, 128), jnp.bfloat16, "N"),
    ((1, 96), (64, 96), jnp.bfloat16, "K"),
    ((1, 128), (64, 256), jnp.bfloat16, "K"),
    ((300, 128), (64, 128), jnp.bfloat16, "M"),
    ((1, 128), (64, 128), jnp.float32, "bfloat16"),
])
def test_bad_shapes_raise_value_error(x_shape, w_shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        dm_gpu.decode_matmul(jnp.ones(x_shape, dtype), jnp.ones(w_shape, dtype), interpret=INTERPRET)


# ------------------------------------------------------------------ the model and the engine
def _scripts_on_path():
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts")
    if path not in sys.path:
        sys.path.insert(0, path)


def _tiny_forward_inputs(batch=3, context=20, page_size=16):
    _scripts_on_path()
    from bench_forward import decode_batch
    from bench_latency import SHAPES

    from jaxengine.config import ModelConfig
    from jaxengine.models import get_model
    from jaxengine.sharding import map_layers

    cfg = ModelConfig.from_hf_config(SHAPES["tiny"], dtype="bfloat16")
    model = get_model(cfg.architecture)
    params = model.init_params(cfg, jax.random.PRNGKey(3))
    params = map_layers(params, lambda layer: model.fuse_layer_weights(layer, cfg))
    pages_per_seq = -(-(context + 1) // page_size)
    num_pages = 1 + batch * pages_per_seq
    kv = [jax.random.normal(jax.random.key(i), (num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim),
                            jnp.bfloat16) for i in range(cfg.num_layers)]
    inputs = jax.tree.map(jnp.asarray, decode_batch(batch, context, page_size, pages_per_seq, num_pages,
                                                    tokens=8, seqs=8))
    return cfg, model, params, kv, inputs


@pytest.mark.parametrize("decode", [False, True], ids=["general", "decode-attention"])
def test_forward_with_the_kernel_matches_xla(monkeypatch, decode):
    """forward(dense=mgpu_plain_dense): every layer matmul (q/k/v, o, gate/up with its SwiGLU, down)
    runs a kernel, and the logits match XLA's einsum path within bf16 rounding."""
    from jaxengine.pallas_kernels import decode_matmul
    from jaxengine.pallas_kernels.ragged_paged_attention import get_attention, get_decode_attention

    cfg, model, params, kv, inputs = _tiny_forward_inputs()
    calls = []
    inner, inner_silu = dm_gpu.decode_matmul, dm_gpu.decode_gate_up_silu
    monkeypatch.setattr(dm_gpu, "decode_matmul", lambda x, w, **kw: calls.append(w.shape) or inner(x, w, **kw))
    monkeypatch.setattr(dm_gpu, "decode_gate_up_silu",
                        lambda x, w, **kw: calls.append(("silu",) + w.shape) or inner_silu(x, w, **kw))
    attention = get_attention("reference")
    kw = dict(decode_attention=get_decode_attention("reference")) if decode else {}
    # jitted, so no op is dispatched eagerly beside the interpreter's callbacks
    want, _ = jax.jit(lambda p, kv, b: model.forward(p, cfg, b, kv, attention, **kw))(params, kv, inputs)
    dense = decode_matmul.get_dense("mgpu_plain")  # the norm epilogues: the test below
    got, _ = jax.jit(lambda p, kv, b: model.forward(p, cfg, b, kv, attention, dense=dense, **kw))(
        params, kv, inputs)
    h, f = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    assert set(calls) == {(qkv, h), (h, cfg.num_heads * cfg.head_dim), ("silu", 2 * f, h), (h, f)}
    assert len(calls) == 4 * cfg.num_layers
    want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2 * np.abs(want).max())


@pytest.mark.parametrize("decode", [False, True], ids=["general", "decode-attention"])
def test_forward_with_norm_in_matmuls_matches_xla(monkeypatch, decode):
    """forward(dense=get_dense("mgpu_norm")): no RMSNorm or residual add between the matmuls (the
    residual_norm passed in is not called); q/k/v and gate/up take hg and the sums of squares, o
    and down add the residual; the logits match XLA's path within bf16 rounding."""
    from jaxengine.pallas_kernels import decode_matmul
    from jaxengine.pallas_kernels.ragged_paged_attention import get_attention, get_decode_attention

    cfg, model, params, kv, inputs = _tiny_forward_inputs()
    calls = []
    for name in ("decode_matmul", "decode_matmul_normed", "decode_matmul_residual", "decode_gate_up_silu"):
        inner = getattr(dm_gpu, name)
        monkeypatch.setattr(dm_gpu, name, lambda *a, _n=name, _f=inner, **kw: calls.append(
            (_n, "ss" in kw) if _n == "decode_gate_up_silu" else _n) or _f(*a, **kw))

    def residual_norm(*a):
        raise AssertionError("the residual-norm kernel runs in the matmuls' epilogues")

    attention = get_attention("reference")
    kw = dict(decode_attention=get_decode_attention("reference")) if decode else {}
    want, _ = jax.jit(lambda p, kv, b: model.forward(p, cfg, b, kv, attention, **kw))(params, kv, inputs)
    dense = decode_matmul.get_dense("mgpu_norm")
    got, _ = jax.jit(lambda p, kv, b: model.forward(p, cfg, b, kv, attention, dense=dense,
                                                    residual_norm=residual_norm, **kw))(params, kv, inputs)
    n = cfg.num_layers
    assert sorted(calls, key=str) == sorted(["decode_matmul_normed"] * n + ["decode_matmul_residual"] * 2 * n
                                            + [("decode_gate_up_silu", True)] * n, key=str)
    want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
    np.testing.assert_allclose(got, want, rtol=5e-2, atol=5e-2 * np.abs(want).max())


def test_engine_decodes_through_the_kernel(tmp_path, monkeypatch):
    """LLM(decode_matmul="mgpu"): decode programs (multi-step) and decode-sized single steps run
    the kernels; greedy tokens follow XLA's on a tiny bf16 model."""
    import json

    _scripts_on_path()
    from bench_latency import SHAPES

    from jaxengine import LLM, SamplingParams

    with open(tmp_path / "config.json", "w") as f:
        json.dump({**SHAPES["tiny"], "torch_dtype": "bfloat16"}, f)
    prompts = [{"prompt_token_ids": [5, 9, 2, 7, 1]}, {"prompt_token_ids": [11, 3, 8]}]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = {}
    calls = []
    inner = dm_gpu.decode_matmul
    monkeypatch.setattr(dm_gpu, "decode_matmul", lambda x, w, **kw: calls.append(x.shape) or inner(x, w, **kw))
    for impl, k in [("xla", 4), ("mgpu_plain", 4), ("mgpu", 1), ("mgpu_norm", 4)]:
        llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                  kv_cache_memory_bytes=4 << 20, num_scheduler_steps=k, decode_matmul=impl, warmup=False)
        assert llm.runner.decode_matmul_impl == impl
        outs[impl, k] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    # greedy on random weights: near-ties let float32 SwiGLU (in the kernel) and bf16 SwiGLU (XLA)
    # pick different tokens late in a sequence; the logits themselves are compared in
    # test_forward_with_the_kernel_matches_xla
    for run in (outs["mgpu_plain", 4], outs["mgpu", 1], outs["mgpu_norm", 4]):
        assert [t[:4] for t in run] == [t[:4] for t in outs["xla", 4]]
    assert calls and all(shape[0] <= 32 for shape in calls)  # traced into decode-sized programs only
    assert all(len(t) == 6 for t in outs["xla", 4])
    # the L2 prefetch windows (q/k/v GEMM, the GPU decode kernel's attention, o GEMM) through the
    # whole engine: the same tokens as without them (a prefetch changes no number)
    from jaxengine.pallas_kernels import l2_prefetch
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu_decode
    planned = []

    def windows(stream, rows, gemm):
        win = l2_prefetch.windows(stream, rows, gemm)
        planned.append(sorted(win))
        return win

    monkeypatch.setattr(gpu_decode.LayerChain, "l2_windows", staticmethod(windows))
    for setting in ("", "qkv_mb=0.03,mb=0.04,o_mb=0.2"):
        monkeypatch.setenv("JAXENGINE_L2_PREFETCH", setting)
        llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                  max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory_bytes=4 << 20,
                  num_scheduler_steps=4, decode_matmul="mgpu_norm", attention_impl="gpu", warmup=False)
        outs["l2", setting] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert outs["l2", "qkv_mb=0.03,mb=0.04,o_mb=0.2"] == outs["l2", ""]
    assert ["attention", "o", "qkv"] in planned  # every window planned in the decode programs


def test_config_and_impl_selection(monkeypatch):
    from jaxengine.config import RunnerConfig
    from jaxengine.pallas_kernels import decode_matmul

    # the default ("auto"): the kernels on a Hopper GPU, XLA elsewhere (this CPU, another GPU)
    assert decode_matmul.resolve_impl() == ("mgpu" if decode_matmul._hopper() else "xla")
    assert decode_matmul.get_dense("xla") is None
    assert decode_matmul.get_dense("mgpu") is decode_matmul.mgpu_dense
    assert decode_matmul.get_dense("mgpu_plain") is decode_matmul.mgpu_plain_dense
    # the norm epilogues: "mgpu" where they measured faster (8B-sized hidden, <= 16 token rows),
    # "mgpu_norm" everywhere, "mgpu_plain" never
    rule = decode_matmul.mgpu_dense.use_norm_epilogues
    monkeypatch.delenv("JAXENGINE_MGPU_CLUSTER_SPLIT", raising=False)
    assert rule(8, 4096) and rule(16, 4096) and rule(16, 8192)
    assert not rule(32, 4096) and not rule(64, 4096)
    assert rule(8, 2048) and not rule(32, 2048)  # 1B: o/down split K in a two-CTA cluster
    monkeypatch.setenv("JAXENGINE_MGPU_CLUSTER_SPLIT", "0")
    assert not rule(8, 2048) and rule(8, 4096)  # 1B without the cluster: XLA's split-K sum
    monkeypatch.delenv("JAXENGINE_MGPU_CLUSTER_SPLIT")
    assert decode_matmul.get_dense("mgpu_norm").use_norm_epilogues(64, 2048)
    assert not hasattr(decode_matmul.mgpu_plain_dense, "use_norm_epilogues")
    with pytest.raises(ValueError, match="decode matmul impl"):
        decode_matmul.get_dense("cublas")
    with pytest.raises(ValueError, match="decode_matmul"):
        RunnerConfig(decode_matmul="cublas")
    # the token buckets that take them: up to 64 rows, or $JAXENGINE_FUSED_MATMUL_MAX_TOKENS
    assert RunnerConfig().fused_matmul_max_tokens == 64
    with monkeypatch.context() as mp:
        mp.setenv("JAXENGINE_FUSED_MATMUL_MAX_TOKENS", "128")
        assert RunnerConfig().fused_matmul_max_tokens == 128
        mp.setenv("JAXENGINE_FUSED_MATMUL_MAX_TOKENS", "-1")
        with pytest.raises(ValueError, match="fused_matmul_max_tokens"):
            RunnerConfig()
    with pytest.raises(ValueError, match="pick one"):
        RunnerConfig(decode_matmul="mgpu", matmul_impl="gpu")
    with monkeypatch.context() as mp:  # a TPU host gets a clear error, not a Mosaic GPU compile failure
        mp.setattr(jax, "default_backend", lambda: "tpu")
        with pytest.raises(ValueError, match="not on 'tpu'"):
            decode_matmul.resolve_impl("mgpu")
        assert decode_matmul.resolve_impl("auto") == "xla"
    # auto: the kernels on a Hopper GPU (compute capability 9.x), XLA on other GPUs
    for capability, want in (("9.0", "mgpu"), ("8.0", "xla"), ("10.0", "xla")):
        with monkeypatch.context() as mp:
            mp.setattr(jax, "default_backend", lambda: "gpu")
            mp.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(compute_capability=capability)])
            assert decode_matmul.resolve_impl("auto") == want, capability
            assert decode_matmul.resolve_impl("xla") == "xla"
    # shapes the kernel does not tile fall back to XLA's einsum (same result)
    x, w = jnp.ones((3, 96), jnp.bfloat16), jnp.ones((64, 96), jnp.bfloat16)
    assert not decode_matmul.fits(x, w)
    np.testing.assert_allclose(np.asarray(decode_matmul.mgpu_dense(x, w), np.float32), 96.0)


def test_engine_auto_picks_the_kernels_on_hopper(tmp_path, monkeypatch):
    """decode_matmul="auto" (the default): the kernels where resolve_impl finds a Hopper GPU, XLA
    beside the fused-matmul kernels (matmul_impl="gpu" replaces the same matmuls) and XLA on CPU."""
    import json

    _scripts_on_path()
    from bench_latency import SHAPES

    from jaxengine import LLM
    from jaxengine.pallas_kernels import decode_matmul

    with open(tmp_path / "config.json", "w") as f:
        json.dump({**SHAPES["tiny"], "torch_dtype": "bfloat16"}, f)
    kw = dict(load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory_bytes=4 << 20, warmup=False)
    monkeypatch.setattr(decode_matmul, "_hopper", lambda: False)  # CPU, or a GPU before Hopper
    assert LLM(str(tmp_path), **kw).runner.decode_matmul_impl == "xla"
    monkeypatch.setattr(decode_matmul, "_hopper", lambda: True)
    assert LLM(str(tmp_path), **kw).runner.decode_matmul_impl == "mgpu"
    assert LLM(str(tmp_path), matmul_impl="gpu", **kw).runner.decode_matmul_impl == "xla"
    assert LLM(str(tmp_path), decode_matmul="xla", **kw).runner.decode_matmul_impl == "xla"


@pytest.mark.parametrize("m,n,warp_specialized", [(8, 4096, False), (64, 4096, True), (8, 2048, False)])
def test_kernel_lowers_to_mosaic_gpu_on_any_host(m, n, warp_specialized):
    """The compiled path's lowering (Pallas -> Mosaic GPU MLIR, transposed epilogue store
    included) for the 8B o_proj shape, checked on the CPU host too: one Mosaic GPU custom call."""
    from jax import export
    sds = jax.ShapeDtypeStruct
    fn = lambda x, w: dm_gpu.decode_matmul(x, w, interpret=False, warp_specialized=warp_specialized)  # noqa: E731
    exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(
        sds((m, n), jnp.bfloat16), sds((n, n), jnp.bfloat16))  # n = 2048: two splits
    assert exp.mlir_module().count("stablehlo.custom_call @mosaic_gpu_v2") == 1
    silu = export.export(jax.jit(lambda x, w: dm_gpu.decode_gate_up_silu(x, w, interpret=False)),
                         platforms=["cuda"], disabled_checks=[
                             export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(
        sds((m, n), jnp.bfloat16), sds((4 * n, n), jnp.bfloat16))
    assert silu.mlir_module().count("stablehlo.custom_call @mosaic_gpu_v2") == 1


@pytest.mark.parametrize("m,ss_sum", [(8, "rows"), (64, "rows"), (8, "chunks"), (64, "chunks")])
def test_norm_epilogue_kernels_lower_to_mosaic_gpu_on_any_host(m, ss_sum, monkeypatch):
    """The mgpu_norm kernels' compiled lowering at 8B shapes (one split: the epilogues in the
    kernel), layout inference included: the residual tile's transposed load, the sum of squares
    across warps, the row-vector 1/rms broadcast."""
    from jax import export
    sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16

    def lower(fn, *args):
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*args)
        return exp.mlir_module().count("stablehlo.custom_call @mosaic_gpu_v2")

    h = 4096
    monkeypatch.setenv("JAXENGINE_MGPU_SS_SUM", ss_sum)
    assert dm_gpu.default_config(m, h, h)["splits"] == 1
    assert lower(lambda x, w, r, g: dm_gpu.decode_matmul_residual(x, w, r, g, interpret=False),
                 sds((m, h), bf), sds((h, h), bf), sds((m, h), bf), sds((h,), bf)) == 1
    ss = sds((h // 64, m), jnp.float32)
    assert lower(lambda x, w, ss: dm_gpu.decode_matmul_normed(x, w, ss, 1e-5, interpret=False),
                 sds((m, h), bf), sds((6144, h), bf), ss) == 1
    assert lower(lambda x, w, ss: dm_gpu.decode_gate_up_silu(x, w, ss=ss, eps=1e-5, interpret=False),
                 sds((m, h), bf), sds((2 * 14336, h), bf), ss) == 1


@pytest.mark.parametrize("m", [8, 64])
@pytest.mark.parametrize("kind", ["plain", "residual", "normed"])
def test_cluster_split_k_keeps_the_epilogue_in_the_kernel(kind, m, monkeypatch):
    """Two-way split-K shapes (1B's o projection, N = 2048: 32 blocks of 64 features) as clusters
    of two CTAs: the second hands its accumulator to the first through distributed shared memory,
    which runs the epilogue.  Compiled on a Hopper GPU: against the reference.  Elsewhere: the
    lowering (Mosaic GPU's interpreter has no rule for the hand-off, async_store_smem), one
    kernel and no XLA reduction after it; the interpreter itself keeps the XLA split path."""
    from jax import export
    h, bf = 2048, jnp.bfloat16
    monkeypatch.delenv("JAXENGINE_MGPU_CLUSTER_SPLIT", raising=False)
    assert dm_gpu.cluster_split_default()  # on by default
    monkeypatch.setenv("JAXENGINE_MGPU_CLUSTER_SPLIT", "1")
    assert dm_gpu.cluster_split_default() and dm_gpu.default_config(m, h, h)["splits"] == 2

    def run(x, w, res, g, ss, interpret):
        kw = dict(interpret=interpret)
        if kind == "plain":
            return dm_gpu.decode_matmul(x, w, **kw)
        if kind == "residual":
            return dm_gpu.decode_matmul_residual(x, w, res, g, **kw)
        return dm_gpu.decode_matmul_normed(x, w, ss, 1e-5, **kw)

    kx, kw_, kr, kg, ks = jax.random.split(jax.random.key(m + len(kind)), 5)
    x, w = _normal(kx, (m, h)), _normal(kw_, (h, h), 0.05)
    res, g = _normal(kr, (m, h)), _normal(kg, (h,), 0.1, 1.0)
    ss = jax.random.uniform(ks, (h // 64, m), jnp.float32, 0.1, 4.0) * h
    if INTERPRET:
        exp = export.export(jax.jit(lambda *a: run(*a, interpret=False)), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(x, w, res, g, ss)
        text = exp.mlir_module()
        assert text.count("stablehlo.custom_call @mosaic_gpu_v2") == 1
        assert "stablehlo.reduce" not in text  # no split-K sum after the kernel
        monkeypatch.setenv("JAXENGINE_MGPU_CLUSTER_SPLIT", "0")
        plain = export.export(jax.jit(lambda *a: run(*a, interpret=False)), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(x, w, res, g, ss).mlir_module()
        assert "stablehlo.reduce" in plain  # switched off: XLA sums the two splits' partials
        return
    got = run(x, w, res, g, ss, interpret=False)
    if kind == "plain":
        _close(got, reference_decode_matmul(x, w))
    elif kind == "residual":
        want = reference.decode_matmul_residual(x, w, res, g)
        _close(got[0], want[0])
        _close(got[1], want[1])
        _close(got[2].sum(0)[:m], want[2].sum(0)[:m])
    else:
        _close(got, reference.decode_matmul_normed(x, w, ss, 1e-5))


def test_pdl_marks_the_kernels_for_programmatic_dependent_launch(monkeypatch):
    """pdl=1 (or $JAXENGINE_MGPU_PDL=1): every kernel waits on griddepcontrol before touching
    memory the kernels around it write and its Mosaic GPU module carries the uses_pdl attribute
    the runtime launches by; pdl=2 also prefetches the first weight tiles into L2 before the wait;
    off by default, and never in the interpreter."""
    from jax import export
    sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    m, h = 8, 512

    def module(fn, *args):
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*args).mlir_module()

    x, w, ss = sds((m, h), bf), sds((h, h), bf), sds((h // 64, m), jnp.float32)
    kernels = [lambda x, w, ss, **kw: dm_gpu.decode_matmul(x, w, interpret=False, **kw),
               lambda x, w, ss, **kw: dm_gpu.decode_matmul_residual(
                   x, w, x, jnp.ones((h,), bf), splits=1, interpret=False, **kw)[0],
               lambda x, w, ss, **kw: dm_gpu.decode_matmul_normed(x, w, ss, 1e-5, splits=1, interpret=False, **kw),
               lambda x, w, ss, **kw: dm_gpu.decode_gate_up_silu(x, w, ss=ss, eps=1e-5, interpret=False, **kw)]
    l2_prefetch = "cp.async.bulk.prefetch.tensor"  # pdl=2: the first ring's weight tiles into L2
    monkeypatch.delenv("JAXENGINE_MGPU_PDL", raising=False)
    assert dm_gpu.pdl_default() == 0
    for kernel in kernels:
        off = module(lambda x, w, ss: kernel(x, w, ss), x, w, ss)
        on = module(lambda x, w, ss: kernel(x, w, ss, pdl=1), x, w, ss)
        on2 = module(lambda x, w, ss: kernel(x, w, ss, pdl=2), x, w, ss)
        assert "uses_pdl" not in off and "griddepcontrol" not in off and l2_prefetch not in off
        assert "uses_pdl" in on and "griddepcontrol" in on and l2_prefetch not in on
        assert "uses_pdl" in on2 and l2_prefetch in on2
    for value, want in (("1", 1), ("prefetch", 2), ("2", 2), ("0", 0)):
        monkeypatch.setenv("JAXENGINE_MGPU_PDL", value)
        assert dm_gpu.pdl_default() == want
    monkeypatch.setenv("JAXENGINE_MGPU_PDL", "1")
    assert "uses_pdl" in module(lambda x, w, ss: kernels[0](x, w, ss), x, w, ss)
    # the interpreter ignores it: same result as without
    xv = jax.random.normal(jax.random.key(1), (m, h), jnp.float32).astype(bf)
    wv = (jax.random.normal(jax.random.key(2), (128, h), jnp.float32) * 0.05).astype(bf)
    got = dm_gpu.decode_matmul(xv, wv, interpret=INTERPRET, pdl=2)
    jax.effects_barrier()
    _close(got, reference_decode_matmul(xv, wv))


def test_l2_next_prefetches_the_next_gemms_regions_and_changes_no_result(monkeypatch):
    """l2_next (the q/k/v and o GEMMs' L2 prefetch windows, pallas_kernels/l2_prefetch): the kernel
    takes the next weights as extra inputs and its CTAs issue TMA L2 prefetches of their boxes
    (cp.async.bulk.prefetch.tensor in the lowered module, for sm_90 on any host), on the plain
    ring, the cluster pair and both epilogues; the results are those without (the interpreter runs
    the prefetches as no-ops; the compiled tests check the numbers on a GPU); a region that does
    not fit the weight in 64-row / 64-column boxes is a ValueError, and the dense wrappers drop
    one whose rows are not whole boxes instead (a prefetch is a hint)."""
    from jax import export

    from jaxengine.pallas_kernels import decode_matmul
    sds, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    m, h, f = 8, 512, 1024
    prefetch = "cp.async.bulk.prefetch.tensor"

    def module(fn, *args):
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*args).mlir_module()

    gu_region, down_region = (2 * f, 1, 0, 256, h), (h, 2, 128, 256, f // 2)
    for cluster in (False, True):
        def residual(x, w, gu, dn, **kw):
            return dm_gpu.decode_matmul_residual(x, w, x, jnp.ones((h,), bf), splits=2, cluster=cluster,
                                                 interpret=False, **kw)[0]

        def normed(x, w, gu, dn, **kw):
            ss = jnp.ones((h // 64, m), jnp.float32)
            return dm_gpu.decode_matmul_normed(x, w, ss, 1e-5, splits=2, cluster=cluster, interpret=False, **kw)

        for kernel in (residual, normed):
            args = (sds((m, h), bf), sds((h, h), bf), sds((2 * f, h), bf), sds((h, f), bf))
            off = module(kernel, *args)
            on = module(lambda x, w, gu, dn: kernel(x, w, gu, dn, l2_next=((gu, gu_region), (dn, down_region))),
                        *args)
            assert prefetch not in off and prefetch in on
            assert on.count("mosaic_gpu_v2") == off.count("mosaic_gpu_v2")  # the same one kernel
    with pytest.raises(ValueError, match="l2_next"):
        dm_gpu.decode_matmul_residual(jnp.ones((m, h), bf), jnp.ones((h, h), bf), jnp.ones((m, h), bf),
                                      jnp.ones((h,), bf), l2_next=((jnp.ones((h, f), bf), (h, 2, 0, 300, 512)),))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, h)), bf)
    w = jnp.asarray(rng.standard_normal((h, h)) * 0.05, bf)
    gu = jnp.asarray(rng.standard_normal((2 * f, h)), bf)
    want = dm_gpu.decode_matmul_residual(x, w, x, jnp.ones((h,), bf), interpret=INTERPRET)
    got = dm_gpu.decode_matmul_residual(x, w, x, jnp.ones((h,), bf), interpret=INTERPRET,
                                        l2_next=((gu, gu_region),))
    jax.effects_barrier()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert decode_matmul.mgpu_dense.accepts_l2_next
    assert decode_matmul._boxed(((gu, (100, 1, 0, 64, h)), (gu, gu_region))) == ((gu, gu_region),)
