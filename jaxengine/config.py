"""One engine configuration, made once from user arguments and the checkpoint's config.json.

Frozen dataclasses, validated at construction with messages that name the field.  Every module
receives the part it needs (ModelConfig to models/, CacheConfig to the KV-cache manager, ...).
This module imports nothing else of ours.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

SUPPORTED_DTYPES = ("auto", "bfloat16", "float32", "float16")


def _tristate(value: str) -> bool | None:
    """An on/off/auto environment switch: "1"/"true"/"on" -> True, "0"/"false"/"off" -> False,
    anything else ("auto", empty) -> None (the component decides)."""
    v = value.strip().lower()
    return True if v in ("1", "true", "on") else False if v in ("0", "false", "off") else None


def _env_optional_int(name: str, default: str) -> int | None:
    """An environment number where "", "none" or "off" mean None."""
    value = os.environ.get(name, default)
    v = value.strip().lower()
    if v in ("", "none", "off"):
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"${name} must be an integer or 'none', got {value!r}") from None


def _env_background_compile_above() -> int | str | None:
    name = "JAXENGINE_BACKGROUND_COMPILE_ABOVE"
    if os.environ.get(name, "auto").strip().lower() == "auto":
        return "auto"
    return _env_optional_int(name, "auto")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, read from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # frozen dict items
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama/Mistral/Qwen3 when attention_bias
    qk_norm: bool  # Qwen3
    sliding_window: int | None
    dtype: str  # "bfloat16" | "float32" | "float16": params, activations and KV cache
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    o_bias: bool = False  # attention_bias: true also puts a bias on o_proj (not in Qwen2)
    mlp_bias: bool = False  # Llama's mlp_bias: gate/up/down biases

    def __post_init__(self):
        _check(self.num_heads % self.num_kv_heads == 0,
               f"num_attention_heads ({self.num_heads}) must be a multiple of "
               f"num_key_value_heads ({self.num_kv_heads})")
        _check(self.dtype in SUPPORTED_DTYPES[1:], f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], dtype: str = "auto") -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else hf.get("model_type", "<missing>")
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // num_heads
        # transformers >= 5 writes rope_theta/rope_scaling into one "rope_parameters" dict.
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = float(hf.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        rope_scaling = hf.get("rope_scaling")
        if rope_scaling is None and rope_params:
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            rope_scaling = None if rope_type == "default" else {**rope_scaling, "rope_type": rope_type}
        if dtype == "auto":
            torch_dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16")
            dtype = {"float32": "float32", "float16": "float16"}.get(torch_dtype, "bfloat16")
        model_type = hf.get("model_type", "")
        sliding = hf.get("sliding_window")
        if model_type.startswith("qwen") and not hf.get("use_sliding_window", False):
            sliding = None  # Qwen configs carry a window they do not use
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", False)) or model_type == "qwen2",
            o_bias=bool(hf.get("attention_bias", False)) and model_type != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            dtype=dtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV page
    num_pages: int = 0  # filled in by the runner from the memory budget
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self):
        _check(self.block_size in (8, 16, 32, 64, 128),
               f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
               f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    # Multi-step decoding: a step in which every request decodes one token with the plain sampler
    # (greedy / temperature) runs this many decode iterations in one device program.
    num_scheduler_steps: int = 1

    def __post_init__(self):
        _check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _check(self.num_scheduler_steps >= 1,
               f"num_scheduler_steps must be >= 1, got {self.num_scheduler_steps}")
        _check(self.max_num_batched_tokens >= 1,
               f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _check(self.max_model_len >= 2, f"max_model_len must be >= 2, got {self.max_model_len}")
        _check(self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
               "with enable_chunked_prefill=False, max_num_batched_tokens "
               f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self):
        _check(self.tensor_parallel_size >= 1,
               f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        _check(self.data_parallel_size >= 1,
               f"data_parallel_size must be >= 1, got {self.data_parallel_size}")


def default_compilation_cache_dir() -> str:
    return os.environ.get("JAXENGINE_COMPILATION_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "jaxengine", "xla"))


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    # Token-count buckets; None means powers of two from min_token_bucket up to max_num_batched_tokens.
    token_buckets: tuple[int, ...] | None = None
    # $JAXENGINE_MIN_TOKEN_BUCKET sets it (an experiment switch, nineteenth session: at batch 1 the
    # 8-row bucket runs 7 padding rows through every kernel; the decode attention's grid is then
    # 8x the real row's programs, the padding ones storing zeros and counting for the split merge).
    min_token_bucket: int = dataclasses.field(
        default_factory=lambda: int(os.environ.get("JAXENGINE_MIN_TOKEN_BUCKET", "8")))
    # "" / None disables the persistent compilation cache.
    compilation_cache_dir: str | None = dataclasses.field(default_factory=default_compilation_cache_dir)
    # Attention implementation: "auto" (by backend), "reference", "gpu", "tpu".
    attention_impl: str = dataclasses.field(
        default_factory=lambda: os.environ.get("JAXENGINE_ATTENTION", "auto"))
    max_logprobs: int = 20
    warmup: bool = True
    # Warm-up compiles the token buckets up to this size before the engine starts (LLM() returns)
    # and the bigger ones on a background thread afterwards, in increasing order; until a bucket
    # is ready the scheduler's token budget stops at the biggest ready one (ModelRunner.
    # token_budget).  So a large max_num_batched_tokens (8192 on a GPU, where it measured faster
    # for long prompts) costs no start-up time.  None or 0: every bucket before the start.  One
    # process only (multi-host runs compile everything first).  "auto" (background_compile_limit):
    # 256 on a GPU (H100, 8B, warm start to the first token 18.8-18.9 s against 21.5-22.0 s at
    # 2048, twenty-first session; the buckets 512-2048 ready ~10 s later), 2048 elsewhere.
    # $JAXENGINE_BACKGROUND_COMPILE_ABOVE sets it.
    background_compile_above: int | str | None = dataclasses.field(
        default_factory=lambda: _env_background_compile_above())
    # Threads that compile the warm-up's programs (ModelRunner.warmup): each bucket's programs
    # are lowered and compiled (or loaded from the persistent cache) by a pool of this many
    # threads, then run once in order.  Lowering holds the GIL; XLA's compile, the cache load and
    # Mosaic GPU's kernel compile do not, so they overlap.  None = auto: min(8, CPUs) on a GPU
    # with one process (measured there: BENCHMARKS.md, twenty-first session), else 1 (in order, as
    # before; unmeasured on TPU).  $JAXENGINE_COMPILE_THREADS sets it.
    compile_threads: int | None = dataclasses.field(
        default_factory=lambda: _env_optional_int("JAXENGINE_COMPILE_THREADS", "none"))
    # Matmuls of decode-sized buckets: "reference" (XLA), "gpu" (the fused Pallas kernels of
    # pallas_kernels/fused_matmul; interpret mode on CPU), "auto" (= reference: XLA measured faster).
    matmul_impl: str = dataclasses.field(
        default_factory=lambda: os.environ.get("JAXENGINE_MATMUL", "auto"))
    # Token buckets up to this size use the fused matmuls (and, with decode_matmul, the Mosaic GPU
    # decode matmuls, which take up to 256 rows); larger ones XLA's GEMMs.
    # $JAXENGINE_FUSED_MATMUL_MAX_TOKENS sets it (an experiment switch: the 128-token bucket of a
    # 128-token prompt at 8B runs ~2x its bound on XLA's GEMMs, seventeenth session; at 128 the
    # Mosaic kernels made that step slower, 11.5 ms against 7.8, H200, eighteenth session).
    fused_matmul_max_tokens: int = dataclasses.field(
        default_factory=lambda: int(os.environ.get("JAXENGINE_FUSED_MATMUL_MAX_TOKENS", "64")))
    # The layers' matmuls in decode-sized buckets (token buckets up to fused_matmul_max_tokens, and
    # the multi-step decode programs): "xla" (XLA's GEMMs), "mgpu" (pallas_kernels/decode_matmul:
    # Mosaic GPU TMA + wgmma weight streaming, Hopper; interpret mode on CPU; single device),
    # "auto" = mgpu on a Hopper GPU (faster than XLA in every H200 decode A/B, tenth session),
    # else xla.  mgpu moves the residual adds and RMSNorms into the kernels' epilogues where that
    # measured faster (<= 16 token rows, hidden >= 3840); "mgpu_norm" always, "mgpu_plain" never.
    decode_matmul: str = dataclasses.field(
        default_factory=lambda: os.environ.get("JAXENGINE_DECODE_MATMUL", "auto"))
    # Params layout on the device (models.llama.LAYOUTS): "hf" (the checkpoint's tensors), "fused"
    # (q/k/v and gate/up each one tensor: one GEMM apiece), "auto" = fused, or hf where the
    # fused-matmul kernels run (they take the hf layout).
    param_layout: str = dataclasses.field(
        default_factory=lambda: os.environ.get("JAXENGINE_PARAM_LAYOUT", "auto"))
    # Multi-step decode programs (num_scheduler_steps > 1) run the decode attention that rotates
    # q/k and writes the KV slots itself (ragged_paged_attention/decode.py: on GPU one Pallas
    # kernel instead of rope + scatter + attention + combine).  False: the general path, for A/B.
    fuse_decode_attention: bool = dataclasses.field(
        default_factory=lambda: os.environ.get("JAXENGINE_FUSE_DECODE_ATTENTION", "1") not in ("0", "false"))
    # With num_scheduler_steps = 1: run each decode-only step as one program (forward with the
    # decode attention above, then the sampler: the multi-step program with K = 1) instead of
    # `forward` + `sample`.  Opt-in: on H100s, 8B batch 1 169.9 tok/s against 162.5 for the
    # two-program path, but 1B batch 1 466-530 against 593 (runs on different machines, not yet
    # side by side: scripts/gpu_suite.sh decodeprog).  One more program per decode bucket and mode.
    decode_program: bool = dataclasses.field(
        default_factory=lambda: os.environ.get("JAXENGINE_DECODE_PROGRAM", "0") in ("1", "true"))

    # Multi-step decode programs: how many of the K iterations one trip of the device loop runs.
    # 1 = a lax.fori_loop of K trips; 0 (or >= K) = no loop, the K iterations unrolled into one
    # straight-line program.  The loop is a fori_loop of static bounds, so XLA annotates its trip
    # count (the CPU program's HLO carries known_trip_count = K, tests/test_bench_scripts.py) and
    # XLA:GPU's while thunk runs the body K times without reading the predicate back (a loop of
    # unknown count copies it to the host and waits every trip); `gpu_suite.sh loopcheck` checks
    # the GPU program.  Unrolled programs take longer to compile, and on a GPU their command
    # buffer is updated before every call (twelfth session: slower at 1B).
    multi_step_unroll: int = dataclasses.field(
        default_factory=lambda: int(os.environ.get("JAXENGINE_MULTI_STEP_UNROLL", "1")))

    # Issue every device call from one worker thread (ModelRunner._on_device), so the host's work
    # between steps overlaps a call that blocks its caller (an XLA:GPU while loop returns only at
    # its last trip).  None ("auto", the default) = on for one GPU in one process, where it
    # measured faster at every point (H200, thirteenth session, engine K = 8: 1B b1 990.6 tok/s
    # against 948.7, b64 38,702 / 37,708; 8B b1 241.3 / 238.7, b64 9,860 / 9,715), off elsewhere
    # (a CPU or TPU call does not block its caller; multi-device meshes and multi-host runs are
    # unmeasured).
    dispatch_thread: bool | None = dataclasses.field(
        default_factory=lambda: _tristate(os.environ.get("JAXENGINE_DISPATCH_THREAD", "auto")))

    # How the FILTER and FULL samplers' top-k / top-p find their thresholds (runner/sampler.py,
    # FILTER_IMPLS; the same tokens): "search" (a 16-way search over the floats' order, no sort;
    # H200 1B FULL sampler 0.440 ms a call at batch 1 against 0.561 with "sort", 1.84 ms against
    # 2.19 at batch 64), "sort" (each row sorted), "candidates" (each row's 256 largest values,
    # with "sort" behind a lax.cond for rows whose kept tokens reach past them), or "auto" (the
    # default): candidates on CPU, search on GPU and TPU.
    sampler_filter: str = dataclasses.field(
        default_factory=lambda: os.environ.get("JAXENGINE_SAMPLER_FILTER", "auto").strip().lower())

    # Residual add + the RMSNorm after it as one call (pallas_kernels/residual_norm) in every
    # program: "gpu" the Pallas kernel (one kernel where XLA:GPU launches two or more), "reference"
    # the jnp composition, "off" the model's own ops, "auto" = gpu on a GPU backend, off elsewhere.
    residual_norm: str = dataclasses.field(
        default_factory=lambda: os.environ.get("JAXENGINE_RESIDUAL_NORM", "auto"))

    def background_compile_limit(self, backend: str) -> int | None:
        """background_compile_above resolved: "auto" is 256 on a GPU, 2048 elsewhere; 0 is None."""
        b = self.background_compile_above
        if b == "auto":
            return 256 if backend == "gpu" else 2048
        return b or None

    def __post_init__(self):
        b = self.background_compile_above
        _check(b is None or b == "auto" or (isinstance(b, int) and not isinstance(b, bool) and b >= 0),
               f"background_compile_above must be an int >= 0, None or 'auto'; got {b!r}")
        _check(self.compile_threads is None or (isinstance(self.compile_threads, int) and self.compile_threads >= 1),
               f"compile_threads must be an int >= 1 or None (auto); got {self.compile_threads!r}")
        _check(isinstance(self.max_logprobs, int) and self.max_logprobs >= 0,
               f"max_logprobs must be an int >= 0; got {self.max_logprobs!r}")
        _check(self.residual_norm in ("auto", "gpu", "reference", "off"),
               f"residual_norm must be one of auto, gpu, reference, off; got {self.residual_norm!r}")
        _check(self.attention_impl in ("auto", "reference", "gpu", "tpu"),
               f"attention_impl must be one of auto, reference, gpu, tpu; got {self.attention_impl!r}")
        _check(self.matmul_impl in ("auto", "reference", "gpu"),
               f"matmul_impl must be one of auto, reference, gpu; got {self.matmul_impl!r}")
        _check(self.decode_matmul in ("auto", "xla", "mgpu", "mgpu_norm", "mgpu_plain"),
               "decode_matmul must be one of auto, xla, mgpu, mgpu_norm, mgpu_plain; got "
               f"{self.decode_matmul!r}")
        _check(not (self.decode_matmul.startswith("mgpu") and self.matmul_impl == "gpu"),
               "decode_matmul='mgpu' and matmul_impl='gpu' both replace the decode matmuls: pick one")
        _check(self.param_layout in ("auto", "hf", "fused"),
               f"param_layout must be one of auto, hf, fused; got {self.param_layout!r}")
        _check(not (self.param_layout == "fused" and self.matmul_impl == "gpu"),
               "param_layout='fused' cannot run with matmul_impl='gpu' (the fused-matmul kernels take "
               "the hf layout)")
        _check(self.sampler_filter in ("auto", "sort", "search", "candidates"),
               f"sampler_filter must be one of auto, sort, search, candidates; got {self.sampler_filter!r}")
        _check(self.multi_step_unroll >= 0,
               f"multi_step_unroll must be >= 0 (0: fully unrolled), got {self.multi_step_unroll}")
        _check(self.fused_matmul_max_tokens >= 0,
               f"fused_matmul_max_tokens must be >= 0, got {self.fused_matmul_max_tokens}")
        _check(self.min_token_bucket >= 1, f"min_token_bucket must be >= 1, got {self.min_token_bucket}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model_path: str
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    runner: RunnerConfig
    seed: int = 0
    hf_config: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)
