"""ModelRunner: device state (params, KV pages, penalty state) and the compiled programs per bucket.

A SchedulerOutput becomes flat host arrays (token ids, positions, slot mapping, query start
offsets, kv lengths, page-table rows, sampling knobs), padded to a bucket of token count; one
device_put, then two programs: `forward` (per token bucket; KV pages donated, updated in place)
and `sample` (per request bucket and sampling mode, PLAIN or FULL, picked on the host), and one
read-back of the sampled ids.  No program branches on data (see `forward` below for why).  Every
bucket and mode is compiled at start-up, so serving never compiles: the buckets up to
RunnerConfig.background_compile_above before the engine starts, the bigger ones on a background
thread after (the scheduler's budget, `token_budget`, stays within the buckets ready).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
import weakref
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxengine.config import EngineConfig
from jaxengine.engine.scheduler import PENDING_TOKEN, SchedulerOutput, uses_penalties
from jaxengine.pallas_kernels import fused_matmul
from jaxengine.pallas_kernels import decode_matmul
from jaxengine.pallas_kernels import residual_norm as residual_norm_kernels
from jaxengine.pallas_kernels.ragged_paged_attention import get_attention, get_decode_attention, per_forward, resolve_impl
from jaxengine.pallas_kernels.ragged_paged_attention.decode import decode_slots
from jaxengine.runner import sampler
from jaxengine.runner import compile_watch
from jaxengine.runner.compile_watch import CompileCounter

logger = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 512 * 1024**2


def kv_bytes_per_page(cfg: EngineConfig) -> int:
    m = cfg.model
    return (m.num_layers * cfg.cache.block_size * 2 * m.num_kv_heads * m.head_dim
            * jnp.dtype(m.dtype).itemsize)


def kv_cache_budget_bytes(cfg: EngineConfig, device: jax.Device | None = None) -> int:
    """kv_cache_memory_bytes if given, else gpu_memory_utilization of the device memory left."""
    if cfg.cache.kv_cache_memory_bytes is not None:
        return cfg.cache.kv_cache_memory_bytes
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return _CPU_DEFAULT_KV_BYTES
    limit = stats["bytes_limit"] * cfg.cache.gpu_memory_utilization
    return max(int(limit - stats.get("bytes_in_use", 0)), 0)


def token_buckets(cfg: EngineConfig) -> tuple[int, ...]:
    if cfg.runner.token_buckets:
        buckets = sorted(set(cfg.runner.token_buckets))
        if buckets[-1] < cfg.scheduler.max_num_batched_tokens:
            buckets.append(cfg.scheduler.max_num_batched_tokens)
        return tuple(buckets)
    out, b = [], cfg.runner.min_token_bucket
    while b < cfg.scheduler.max_num_batched_tokens:
        out.append(b)
        b *= 2
    out.append(cfg.scheduler.max_num_batched_tokens)
    return tuple(out)


# Sampling knobs kept per runner slot (ModelRunner._slot_samp) and their values for an empty slot;
# the other per-request sampler inputs change every step and are built in dispatch().
_SLOT_SAMPLING_DEFAULTS = {
    "temperature": np.zeros((1,), np.float32), "top_k": np.zeros((1,), np.int32),
    "top_p": np.ones((1,), np.float32), "min_p": np.zeros((1,), np.float32),
    "seed": np.zeros((1,), np.uint32), "presence_penalty": np.zeros((1,), np.float32),
    "frequency_penalty": np.zeros((1,), np.float32), "repetition_penalty": np.ones((1,), np.float32),
}


@dataclasses.dataclass
class SampleResult:
    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token id, logprob), best first


def uses_fused_matmul(runner_cfg: Any, model: ModuleType, model_cfg: Any, mesh: Any) -> bool:
    """Whether decode-sized buckets run the fused-matmul kernels (opt-in, one device, tileable shapes)."""
    return (fused_matmul.resolve_impl(runner_cfg.matmul_impl) == "gpu" and mesh is None
            and bool(getattr(model, "fusable", None)) and model.fusable(model_cfg))


def param_layout(runner_cfg: Any, model: ModuleType, model_cfg: Any, mesh: Any) -> str:
    """The params layout the engine runs (RunnerConfig.param_layout; "auto" picks "fused" where the
    model family has it, measured faster on the H100: BENCHMARKS.md)."""
    if runner_cfg.param_layout != "auto":
        return runner_cfg.param_layout
    if not hasattr(model, "fuse_layer_weights") or uses_fused_matmul(runner_cfg, model, model_cfg, mesh):
        return "hf"
    return "fused"


def residual_norm_impl(setting: str) -> str:
    """RunnerConfig.residual_norm -> "gpu", "reference" or "off" ("auto": the kernel where the
    package's auto picks it, i.e. on a GPU backend; elsewhere the model's own ops)."""
    if setting == "auto":
        return "off" if residual_norm_kernels.resolve_impl("auto") == "reference" else "gpu"
    return setting


def resolve_dispatch_thread(setting: bool | None, mesh: Any = None) -> bool:
    """RunnerConfig.dispatch_thread: None ("auto") = a dispatching thread for one GPU in one
    process (what was measured), whose multi-step while loop blocks the launching thread until its
    last trip; a mesh of several devices or processes keeps the calling thread until measured."""
    if setting is not None:
        return bool(setting)
    one_device = mesh is None or mesh.devices.size == 1
    return jax.default_backend() in ("gpu", "cuda") and jax.process_count() == 1 and one_device


# Runners that started a background compilation: at interpreter exit each finishes the bucket it
# is compiling and skips the rest (a daemon thread killed inside XLA's compiler can crash the exit).
_BACKGROUND_RUNNERS: "weakref.WeakSet[ModelRunner]" = weakref.WeakSet()


@atexit.register
def _stop_background_compiles() -> None:
    for runner in list(_BACKGROUND_RUNNERS):
        runner.stop_background_compile()


class ModelRunner:
    def __init__(self, cfg: EngineConfig, params: Any, model: ModuleType, num_pages: int,
                 mesh: Any = None):
        self.cfg = cfg
        self.params = params
        self.model = model
        self.page_size = cfg.cache.block_size
        self.num_pages = num_pages
        self.pages_per_seq = -(-cfg.scheduler.max_model_len // self.page_size)
        self.buckets = token_buckets(cfg)
        # request-count padding: a multiple of 8 up to max_num_seqs, and never above the tokens
        self.max_seqs = -(-cfg.scheduler.max_num_seqs // 8) * 8
        self.attention_impl = resolve_impl(cfg.runner.attention_impl)
        attention = get_attention(self.attention_impl)
        # decode-only programs (multi-step): rope + KV write + attention in one call
        decode_attention = (get_decode_attention(self.attention_impl)
                            if cfg.runner.fuse_decode_attention else None)
        # residual add + RMSNorm as one call (None: the model's own ops)
        self.residual_norm_impl = residual_norm_impl(cfg.runner.residual_norm)
        residual_norm = (None if self.residual_norm_impl == "off"
                         else residual_norm_kernels.get_residual_norm(self.residual_norm_impl))
        m = cfg.model
        # Decode-sized buckets stream every weight once; with matmul_impl="gpu" the fused kernels
        # (RMSNorm, SwiGLU and the residual adds folded into the matmuls) replace XLA's GEMMs and
        # ~10 small kernels a layer there (opt-in: measured slower than XLA on the H100 so far).
        # Single device only: under tensor parallelism the row-parallel matmuls need an
        # all-reduce before the residual add.
        self.matmul_impl = fused_matmul.resolve_impl(cfg.runner.matmul_impl)
        fused = fused_matmul.get_matmul("gpu") if uses_fused_matmul(cfg.runner, model, m, mesh) else None
        self.fused_max_tokens = cfg.runner.fused_matmul_max_tokens if fused is not None else 0
        # decode-sized buckets' matmuls as the Mosaic GPU weight-streaming kernels (auto: on a
        # Hopper GPU; one device: under tensor parallelism XLA partitions its own GEMMs; not beside
        # the fused-matmul kernels, which replace the same matmuls)
        auto_off = mesh is not None or (fused is not None and cfg.runner.decode_matmul == "auto")
        self.decode_matmul_impl = "xla" if auto_off else decode_matmul.resolve_impl(cfg.runner.decode_matmul)
        # unsharded (and without the fused-matmul kernels): every program takes the model's 2-D
        # GEMM form for the fused layout's weights (`dense` = its dense_einsum where no kernel
        # replaces it): XLA:CPU transposed and copied each layer's q/k/v and gate/up weight every
        # step for the 3-D einsums (SmolLM2-135M bf16 on 2 CPU cores, greedy b1: 10.3 -> 23.7
        # tok/s); sharded weights keep the einsums, whose reshape-free form keeps their sharding
        base_dense = getattr(model, "dense_einsum", None) if mesh is None and fused is None else None
        dense = decode_matmul.get_dense(self.decode_matmul_impl) or base_dense
        dense_max_tokens = cfg.runner.fused_matmul_max_tokens
        # mesh: a ("dp"=1, "tp") jax.sharding.Mesh; params arrive already sharded by sharding/ rules
        self.mesh = mesh
        if mesh is not None:
            from jaxengine import sharding
            m = sharding.sharded_model_config(m, mesh.shape["tp"])  # kv heads duplicated up to tp
            attention = sharding.shard_attention(attention, mesh)
            if decode_attention is not None:
                decode_attention = sharding.shard_decode_attention(decode_attention, mesh)
            if residual_norm is not None:
                residual_norm = sharding.shard_replicated(residual_norm, mesh)
            kv_sharding, repl = sharding.kv_cache_sharding(mesh), sharding.replicated(mesh)
        dtype = jnp.dtype(m.dtype)
        # [num_pages, page_size, 2 * num_kv_heads, head_dim] per layer
        kv_shape = (num_pages, self.page_size, 2 * m.num_kv_heads, m.head_dim)
        self.kv_caches = [jnp.zeros(kv_shape, dtype) if mesh is None
                          else sharding.zeros(kv_shape, dtype, kv_sharding) for _ in range(m.num_layers)]
        # slots: one per running request (its last sampled token, penalty statistics), plus a dummy
        self.num_slots = cfg.scheduler.max_num_seqs + 1
        self._worker = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxengine-dispatch")
                        if resolve_dispatch_thread(cfg.runner.dispatch_thread, mesh) else None)
        self._last_future: concurrent.futures.Future | None = None
        self.penalty_state = sampler.init_penalty_state(self.num_slots, m.vocab_size)
        # each slot's last sampled token stays on the device: the next step may be dispatched before
        # the host has read it back (asynchronous scheduling) and takes its input from here
        self.penalty_state["last_tokens"] = jnp.zeros((self.num_slots,), jnp.int32)
        if mesh is not None:
            self.penalty_state = {k: sharding.zeros(v.shape, v.dtype, repl)
                                  for k, v in self.penalty_state.items()}
        self._free_slots = list(range(self.num_slots - 1))
        # Host rows per slot, written when a request takes the slot: its page table (new pages
        # appended as they come: a table only grows while its request holds the slot; a row that
        # finds another table object than the one it copied is rewritten whole) and its
        # sampling knobs (fixed per request).  A step gathers its requests' rows in one fancy index
        # instead of copying each table and reading each knob every step (host time per step).
        self._slot_pages = np.zeros((self.num_slots, self.pages_per_seq), np.int32)
        self._slot_num_pages = [0] * self.num_slots
        self._slot_tables: list[list[int] | None] = [None] * self.num_slots  # the table each row copies
        self._slot_samp = {k: v.repeat(self.num_slots) for k, v in _SLOT_SAMPLING_DEFAULTS.items()}
        self._slot_mode = np.zeros((self.num_slots,), np.int8)  # the sampler mode it needs (sampler.mode_for)
        self._slot_penalties = np.zeros((self.num_slots,), np.bool_)
        self.num_device_inputs = 0  # input tokens taken from the device (asynchronous scheduling)
        self.num_program_steps = 0  # steps run as a decode program (multi-step or K = 1)
        self._slots: dict[str, int] = {}
        self.vocab_size = m.vocab_size
        self.num_logprobs = min(cfg.runner.max_logprobs, m.vocab_size)
        self.sampler_filter = sampler.resolve_filter_impl(cfg.runner.sampler_filter, jax.default_backend())
        self.sampler_branches = jax.default_backend() == "cpu"  # lax.cond is free on CPU (sampler.sample)

        # Two programs a step.  `forward` (one per token bucket) runs the model and writes the KV
        # pages; `sample` (one per request bucket and sampling mode) turns the logits into tokens.
        # The mode is static and chosen on the host from the requests in the step, so no program
        # holds a data-dependent branch (but on CPU, where a branch costs nothing: the
        # "candidates" filter's fallback, the Gumbel noise an all-greedy batch skips): on a GPU,
        # lax.cond reads its predicate back to the host,
        # which blocks the dispatching thread until the device gets there and undoes asynchronous
        # scheduling (measured on the H100: ~10 ms of host time per step at batch 64).
        def gather_logits(logits):
            if mesh is not None:  # logits vocab-parallel as lm_head, then one all-gather for the sampler
                if m.vocab_size % mesh.shape["tp"] == 0:
                    logits = jax.lax.with_sharding_constraint(logits, sharding.vocab_sharding(mesh))
                logits = jax.lax.with_sharding_constraint(logits, repl)
            return logits

        def input_ids(batch, last_tokens):  # pending inputs (asynchronous scheduling) from the device
            pending = batch["input_slot"] >= 0
            return jnp.where(pending, last_tokens[jnp.maximum(batch["input_slot"], 0)], batch["input_ids"])

        def sample_and_count(logits, penalty_state, samp, mode):
            full = mode != sampler.PLAIN  # FILTER and FULL: penalties and filters
            out = sampler.sample(logits, penalty_state, samp, self.num_logprobs, full=full,
                                 logprobs=mode == sampler.FULL, filter_impl=self.sampler_filter,
                                 branches=self.sampler_branches)
            if full:
                penalty_state = sampler.count_sampled(penalty_state, samp["penalty_slot"], out["tokens"],
                                                      samp["count_sampled"])
            return penalty_state, out

        def store_last_tokens(penalty_state, samp, tokens):
            store = jnp.where(samp["store_token"], samp["penalty_slot"], self.num_slots)
            return {**penalty_state,
                    "last_tokens": penalty_state["last_tokens"].at[store].set(tokens, mode="drop")}

        def pack_samples(out):
            # one read-back instead of five: int32 [..., S, 3 + 2K] = token, rank, K top ids, then
            # the float32 bits of the logprob and the K top logprobs (each device-to-host copy
            # costs a fixed ~0.1 ms of host time on a GPU; _read_back splits it again)
            floats = jnp.concatenate([out["logprob"][..., None], out["top_logprobs"]], -1)
            return jnp.concatenate([out["tokens"][..., None], out["rank"][..., None], out["top_ids"],
                                    jax.lax.bitcast_convert_type(floats, jnp.int32)], -1)

        def forward(params, kv_caches, last_tokens, ints, floats, bucket):
            batch, _ = self._unpack(ints, floats, self._layout(*bucket))
            batch["input_ids"] = input_ids(batch, last_tokens)
            matmul = fused if bucket[0] <= self.fused_max_tokens else None
            logits, kv_caches = model.forward(params, m, batch, kv_caches, attention, matmul=matmul,
                                              residual_norm=residual_norm,
                                              dense=dense if bucket[0] <= dense_max_tokens else base_dense)
            logits = gather_logits(logits)
            # the sampling knobs lead both buffers: handed on as they are, so the sampler's
            # programs depend on the request bucket only, not on the token bucket
            _, n_int, n_float = self._layout(bucket[1])
            return kv_caches, logits, ints[:n_int], floats[:n_float]

        def sample(logits, penalty_state, ints, floats, seqs, mode):
            _, samp = self._unpack(ints, floats, self._layout(seqs))
            penalty_state, out = sample_and_count(logits, penalty_state, samp, mode)
            return store_last_tokens(penalty_state, samp, out["tokens"]), pack_samples(out)

        # Multi-step decoding (SchedulerOutput.num_steps = K > 1): a decode-only step run as K
        # iterations of forward + sample inside one program, per sampling mode like `sample`.
        # Token row j is request j; iteration i feeds each request's token sampled by iteration
        # i - 1 at position + i, samples with rng position kv_len + i and (FULL) counts the token
        # for the penalties before the next iteration, exactly as K single steps would.
        def multi_step(params, kv_caches, penalty_state, ints, floats, bucket, k, mode):
            batch, samp = self._unpack(ints, floats, self._layout(*bucket))
            t, s = bucket
            ids = input_ids(batch, penalty_state["last_tokens"])
            seq_of_row = jnp.minimum(jnp.arange(t), s - 1)
            seq_real = jnp.arange(s) < batch["num_seqs"][0]
            n_top = self.num_logprobs

            def body(i, carry):
                kv_caches, penalty_state, ids, packed = carry
                kv_lens = batch["kv_lens"] + jnp.where(seq_real, i, 0)
                pos, slots = decode_slots(kv_lens, batch["page_indices"], batch["num_seqs"], t,
                                          self.page_size, num_pages)
                step = {**batch, "input_ids": ids, "positions": pos, "slot_mapping": slots, "kv_lens": kv_lens}
                # per_forward: the GPU kernel's layers pass one split-merge count buffer along
                logits, kv_caches = model.forward(params, m, step, kv_caches, attention,
                                                  decode_attention=per_forward(decode_attention),
                                                  residual_norm=residual_norm, dense=dense)
                logits = gather_logits(logits)
                penalty_state, out = sample_and_count(logits, penalty_state,
                                                      {**samp, "rng_pos": samp["rng_pos"] + i}, mode)
                # the iteration's samples packed as the read-back wants them: one in-place update
                # of the [k, s, 3 + 2 n_top] result a token, not one per field
                packed = packed.at[i].set(pack_samples(out))
                return kv_caches, penalty_state, out["tokens"][seq_of_row], packed

            packed = jnp.zeros((k, s, 3 + 2 * n_top), jnp.int32)
            carry = (kv_caches, penalty_state, ids, packed)
            # k = 1 (the decode program) without a loop.  K > 1: a fori_loop of K / unroll trips
            # (static bounds: XLA knows its trip count, so XLA:GPU runs it without reading a
            # predicate back; RunnerConfig.multi_step_unroll), or (unroll 0 or >= K) the K
            # iterations unrolled into straight-line code
            unroll = cfg.runner.multi_step_unroll
            if k == 1 or unroll == 0 or unroll >= k:
                for i in range(k):
                    carry = body(i, carry)
            else:
                carry = jax.lax.fori_loop(0, k, body, carry, unroll=unroll)
            kv_caches, penalty_state, _, packed = carry
            return kv_caches, store_last_tokens(penalty_state, samp, packed[k - 1, :, 0]), packed

        # The decode program (RunnerConfig.decode_program, opt-in): with num_scheduler_steps = 1, a
        # decode-only step runs multi_step with k = 1 (forward with the decode attention and the
        # sampler in one program, one dispatch) instead of `forward` + `sample`.
        self.decode_program = cfg.scheduler.num_scheduler_steps == 1 and cfg.runner.decode_program
        self._multi_step = None
        if cfg.scheduler.num_scheduler_steps > 1 or self.decode_program:
            kw = {}
            if mesh is not None:
                kv_sh, pen_sh = [kv_sharding] * m.num_layers, {k: repl for k in self.penalty_state}
                kw = dict(in_shardings=(sharding.params_sharding_tree(params, mesh), kv_sh, pen_sh, repl, repl),
                          out_shardings=(kv_sh, pen_sh, repl))
            self._multi_step = jax.jit(multi_step, donate_argnums=(1, 2), static_argnums=(5, 6, 7), **kw)

        if mesh is None:
            self._forward = jax.jit(forward, donate_argnums=(1,), static_argnums=(5,))
            self._sample = jax.jit(sample, donate_argnums=(1,), static_argnums=(4, 5))
        else:  # explicit shardings: KV pages stay split by kv head, everything else replicated
            kv_sh = [kv_sharding] * m.num_layers
            pen_sh = {k: repl for k in self.penalty_state}
            self._forward = jax.jit(forward, donate_argnums=(1,), static_argnums=(5,),
                                    in_shardings=(sharding.params_sharding_tree(params, mesh), kv_sh, repl,
                                                  repl, repl),
                                    out_shardings=(kv_sh, repl, repl, repl))
            self._sample = jax.jit(sample, donate_argnums=(1,), static_argnums=(4, 5),
                                   in_shardings=(repl, pen_sh, repl, repl), out_shardings=(pen_sh, repl))
        self._layouts: dict[tuple[int, int], tuple] = {}
        self._load_history = jax.jit(sampler.load_history, donate_argnums=(0,))
        self.compile_counter = CompileCounter()
        # Background compilation of the bigger token buckets (warmup, RunnerConfig.
        # background_compile_above): the scheduler's budget is the biggest bucket ready.
        self._ready_budget = cfg.scheduler.max_num_batched_tokens
        self._budget_cond = threading.Condition()
        self._compile_thread: threading.Thread | None = None
        self._stop_compile = threading.Event()
        self.background_compile_error: BaseException | None = None
        # multi-host: a sharding.multihost.StepChannel; the driver (process 0) sends each device call
        # to the workers, which replay it (sharding.multihost.follow) so all run the same programs
        self.channel = None

    # ----------------------------------------------------------------------------- warm-up
    def bucket_for(self, num_tokens: int) -> int:
        for b in self.buckets:
            if b >= num_tokens:
                return b
        raise ValueError(f"{num_tokens} tokens exceed max_num_batched_tokens {self.buckets[-1]}")

    def seqs_for(self, bucket: int) -> int:
        return min(bucket, self.max_seqs)

    def warmup(self, progress: bool = True, background: bool = True) -> None:
        """Compile every bucket now (from the persistent cache when it has them).  With
        `background` (and RunnerConfig.background_compile_above set, one process), token buckets
        above that size compile on a thread after this returns, smallest first: `token_budget`
        is the biggest one ready, `wait_compiled` waits for them."""
        limit = self.cfg.runner.background_compile_limit(jax.default_backend())
        if not background or not limit or jax.process_count() > 1:
            limit = None
        now = [t for t in self.buckets if limit is None or t <= limit or t == self.buckets[0]]
        later = [t for t in self.buckets if t not in now]
        buckets = now
        if progress:
            from tqdm.auto import tqdm
            buckets = tqdm(now, desc="Compiling buckets", unit="bucket")
        sampled: set[int] = set()
        # (program, token bucket, mode, seconds the call took: its compile or its load from the
        # persistent cache, the run itself being asynchronous), for bench_startup.py
        self.warmup_times: list[tuple[str, int, int, float]] = []
        multi_buckets = ([] if self._multi_step is None else
                         sorted({self.bucket_for(n) for n in range(1, self.cfg.scheduler.max_num_seqs + 1)}))
        threads = self.compile_threads()
        self.precompile_s = self.precompile_lower_s = 0.0
        if threads > 1:  # compile everything first on a pool; the calls below then find it compiled
            start = time.perf_counter()
            self._precompile(now, multi_buckets, threads)
            self.precompile_s = time.perf_counter() - start
        for t in buckets:
            s = self.seqs_for(t)
            batch, samp = self._empty_arrays(t, s)
            for mode in (sampler.MODES if s not in sampled else sampler.MODES[:1]):
                start = time.perf_counter()
                self._run(batch, samp, mode=mode)
                self.sync()
                self.warmup_times.append(("step", t, mode, time.perf_counter() - start))
            sampled.add(s)
        if self._multi_step is not None:  # every bucket a decode-only step can land in (K >= 1)
            for t in multi_buckets:
                batch, samp = self._empty_arrays(t, self.seqs_for(t))
                for mode in sampler.MODES:
                    start = time.perf_counter()
                    self._run(batch, samp, mode=mode, num_steps=self.cfg.scheduler.num_scheduler_steps,
                              program=True)
                    self.sync()
                    self.warmup_times.append(("multi_step", t, mode, time.perf_counter() - start))
        tokens = np.full((self.cfg.scheduler.max_model_len,), -1, np.int32)
        self._dispatch_load_history(self.num_slots - 1, tokens, 0)
        self.sync()
        jax.block_until_ready(self.penalty_state)
        if later:
            self._ready_budget = min(now[-1], self.cfg.scheduler.max_num_batched_tokens)
            self._start_background_compile(later, sampled)

    def compile_threads(self) -> int:
        """RunnerConfig.compile_threads, auto resolved: min(8, CPUs) on a GPU with one process."""
        n = self.cfg.runner.compile_threads
        if n is None:
            n = min(8, os.cpu_count() or 1) if jax.default_backend() == "gpu" and jax.process_count() == 1 else 1
        return n

    def _state_specs(self) -> tuple[list, dict]:
        """The device state's types (KV pages, penalty state) for lowering without the arrays.
        They must be the types the steps' calls pass, or the jitted function would not find what
        was compiled: one device, arrays made without a device_put (uncommitted: no sharding in
        the type); a mesh, the explicit shardings the jitted functions take anyway."""
        if self.mesh is None:
            spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
        else:
            spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
        return [spec(x) for x in self.kv_caches], {k: spec(v) for k, v in self.penalty_state.items()}

    def _input_specs(self, t: int, s: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        _, n_int, n_float = self._layout(t, s)
        repl = None
        if self.mesh is not None:
            from jaxengine import sharding
            repl = sharding.replicated(self.mesh)
        return (jax.ShapeDtypeStruct((n_int,), jnp.int32, sharding=repl),
                jax.ShapeDtypeStruct((n_float,), jnp.float32, sharding=repl))

    def _precompile(self, buckets: list[int], multi_buckets: list[int], threads: int) -> None:
        """Lower the warm-up's programs on this thread, in the order the warm-up's calls would
        (each bucket's step: forward, then the sampler's modes for the first bucket of its request
        count; then each decode bucket's multi-step program a mode), and compile each on a pool of
        `threads` threads as soon as it is lowered (RunnerConfig.compile_threads).  Lowering in
        one fixed order keeps the programs, hence the persistent cache's keys, the same from run
        to run (lowered on several threads, an H100's warm start missed 3 of 24 programs); XLA's
        compile, the cache load and Mosaic GPU's kernel compile run on the pool, overlapping.
        The jitted functions keep the executables, so the warm-up's calls compile nothing."""
        kv_specs, penalty_specs = self._state_specs()
        k = self.cfg.scheduler.num_scheduler_steps
        sampled: set[int] = set()

        def lowerings():
            for t in buckets:
                yield from self._bucket_lowerings(t, sampled, kv_specs, penalty_specs)
            for t in multi_buckets:
                s = self.seqs_for(t)
                ints, floats = self._input_specs(t, s)
                for mode in sampler.MODES:
                    yield self._multi_step.lower(self.params, kv_specs, penalty_specs, ints, floats, (t, s), k, mode)

        self.precompile_lower_s = 0.0  # of precompile_s, lowering on this thread (bench_startup.py)
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxengine-precompile") as pool:
            futures, programs = [], lowerings()
            while True:
                start = time.perf_counter()
                lowered = next(programs, None)  # lowered here, on this thread, in order
                self.precompile_lower_s += time.perf_counter() - start
                if lowered is None:
                    break
                futures.append(pool.submit(lowered.compile))
            for f in futures:
                f.result()

    def _bucket_lowerings(self, t: int, sampled: set[int], kv_specs: list, penalty_specs: dict):
        """Bucket t's programs, each lowered as it is taken, in the warm-up's order: `forward`, then
        the sampler's modes if no bucket before it had its request bucket (`sampled`, updated)."""
        s = self.seqs_for(t)
        ints, floats = self._input_specs(t, s)
        fwd = self._forward.lower(self.params, kv_specs, penalty_specs["last_tokens"], ints, floats, (t, s))
        yield fwd
        if s in sampled:
            return
        sampled.add(s)
        for mode in sampler.MODES:
            yield self._lower_sampler(fwd, s, penalty_specs, ints.sharding, mode)

    def _lower_sampler(self, fwd, s: int, penalty_specs: dict, repl, mode: int):
        """The sampler's program for request bucket s and `mode`, lowered for `fwd`'s outputs
        (replicated over a mesh)."""
        outs = [jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=repl)
                for o in jax.tree_util.tree_leaves(fwd.out_info)[-3:]]
        return self._sample.lower(outs[0], penalty_specs, outs[1], outs[2], s, mode)

    # ------------------------------------------------------------------ background compilation
    @property
    def token_budget(self) -> int:
        """The most tokens a step may take now: max_num_batched_tokens, or while bigger buckets
        are still compiling in the background, the biggest bucket ready."""
        return self._ready_budget

    @property
    def compiling(self) -> bool:
        """Whether buckets are still compiling in the background."""
        t = self._compile_thread
        return t is not None and t.is_alive()

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait until the background compilation (if any) is done; True if it is."""
        t = self._compile_thread
        if t is not None:
            t.join(timeout)
        return not self.compiling

    def wait_for_budget(self, above: int, timeout: float) -> int:
        """Wait (at most timeout seconds) until the token budget exceeds `above` or the
        background compilation ends; returns the budget."""
        deadline = time.monotonic() + timeout
        with self._budget_cond:
            while self._ready_budget <= above and self.compiling:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._budget_cond.wait(left)
            return self._ready_budget

    def stop_background_compile(self, timeout: float | None = None) -> None:
        """Finish the bucket being compiled, skip the rest (interpreter exit, shutdown)."""
        self._stop_compile.set()
        self.wait_compiled(timeout)

    def _start_background_compile(self, buckets: list[int], sampled: set[int]) -> None:
        # The device state's types, taken now: the dispatching thread replaces the arrays
        # (donation) while this thread lowers, and lowering needs only their types.
        kv_specs, penalty_specs = self._state_specs()

        def run():
            compile_watch.mark_background_thread()
            try:
                for t in buckets:
                    if self._stop_compile.is_set():
                        return
                    start = time.monotonic()
                    self._compile_bucket(t, sampled, kv_specs, penalty_specs)
                    with self._budget_cond:
                        self._ready_budget = min(t, self.cfg.scheduler.max_num_batched_tokens)
                        self._budget_cond.notify_all()
                    logger.info("token bucket %d compiled in the background (%.1f s); token budget %d",
                                t, time.monotonic() - start, self._ready_budget)
            except BaseException as e:  # keep serving at the budget reached; say why it stopped
                self.background_compile_error = e
                logger.exception("background compilation stopped; the token budget stays at %d",
                                 self._ready_budget)
            finally:
                with self._budget_cond:
                    self._budget_cond.notify_all()

        self._compile_thread = threading.Thread(target=run, name="jaxengine-compile", daemon=True)
        self._compile_thread.start()
        _BACKGROUND_RUNNERS.add(self)

    def _compile_bucket(self, t: int, sampled: set[int], kv_specs: list, penalty_specs: dict) -> None:
        """Compile (without running) the programs a step of bucket t runs: `forward`, and
        `sample` for its request bucket's modes if no smaller bucket had that request bucket.
        The jitted functions keep what was compiled, so the first step of the bucket runs it."""
        for lowered in self._bucket_lowerings(t, sampled, kv_specs, penalty_specs):
            lowered.compile()

    # ------------------------------------------------------------------------------ execute
    def _empty_arrays(self, t: int, s: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        oob = self.num_pages * self.page_size  # dropped by the KV write
        batch = {
            "input_ids": np.zeros((t,), np.int32),
            "positions": np.zeros((t,), np.int32),
            "slot_mapping": np.full((t,), oob, np.int32),
            "kv_lens": np.zeros((s,), np.int32),
            "page_indices": np.zeros((s, self.pages_per_seq), np.int32),
            "cu_q_lens": np.zeros((s + 1,), np.int32),
            "num_seqs": np.zeros((1,), np.int32),
            "logits_indices": np.zeros((s,), np.int32),
            "input_slot": np.full((t,), -1, np.int32),  # >= 0: take the input from that slot's last token
        }
        samp = {
            "temperature": np.zeros((s,), np.float32),
            "top_k": np.zeros((s,), np.int32),
            "top_p": np.ones((s,), np.float32),
            "min_p": np.zeros((s,), np.float32),
            "seed": np.zeros((s,), np.uint32),
            "rng_pos": np.zeros((s,), np.int32),
            "presence_penalty": np.zeros((s,), np.float32),
            "frequency_penalty": np.zeros((s,), np.float32),
            "repetition_penalty": np.ones((s,), np.float32),
            "penalty_slot": np.full((s,), self.num_slots - 1, np.int32),
            "use_penalty": np.zeros((s,), np.bool_),
            "count_sampled": np.zeros((s,), np.bool_),
            "store_token": np.zeros((s,), np.bool_),
        }
        return batch, samp

    def _slot_for(self, seq: Any) -> int:
        slot = self._slots.get(seq.request_id)
        if slot is None:
            slot = self._free_slots.pop()
            self._slots[seq.request_id] = slot
            p = seq.params
            penalties = uses_penalties(p)
            row = self._slot_samp
            row["temperature"][slot] = p.temperature
            row["top_k"][slot] = p.top_k
            row["top_p"][slot] = p.top_p
            row["min_p"][slot] = p.min_p
            row["seed"][slot] = seq.seed % (1 << 32)
            row["presence_penalty"][slot] = p.presence_penalty if penalties else 0.0
            row["frequency_penalty"][slot] = p.frequency_penalty if penalties else 0.0
            row["repetition_penalty"][slot] = p.repetition_penalty if penalties else 1.0
            self._slot_penalties[slot] = penalties
            self._slot_mode[slot] = sampler.mode_for(p, penalties)
        return slot

    def release(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            slot = self._slots.pop(rid, None)
            if slot is not None:
                self._free_slots.append(slot)

    def execute(self, out: SchedulerOutput) -> dict[str, SampleResult]:
        """Run one step and wait for its sampled tokens."""
        return self.collect(self.dispatch(out))

    def dispatch(self, out: SchedulerOutput) -> tuple:
        """Start one step on the device; returns a handle for `collect`.  Does not block."""
        self.release(out.freed_request_ids)
        seqs = out.seqs
        num_tokens = sum(len(s.token_ids) for s in seqs)
        t = self.bucket_for(num_tokens)
        s = self.seqs_for(t)
        batch, samp = self._empty_arrays(t, s)
        ps = self.page_size
        # Per-token values as Python lists, assigned to the arrays once: a decode is one token,
        # and per-element numpy writes would cost more than the arithmetic (host time per step).
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        pending_rows: list[int] = []
        seq_slots: list[int] = []
        kv_lens: list[int] = []
        cu: list[int] = []
        pos = 0
        slot_pages, slot_num_pages, slot_tables = self._slot_pages, self._slot_num_pages, self._slot_tables
        for seq in seqs:
            n = len(seq.token_ids)
            table = seq.page_table
            start = seq.start_pos
            slot = self._slot_for(seq)
            seq_slots.append(slot)
            ids.extend(seq.token_ids)
            if n == 1:
                positions.append(start)
                slots.append(table[start // ps] * ps + start % ps)
            else:
                r = np.arange(start, start + n)
                positions.extend(r.tolist())
                slots.extend((np.asarray(table)[r // ps] * ps + r % ps).tolist())
            if seq.token_ids[-1] == PENDING_TOKEN:  # sampled by the step in flight
                pending_rows.append(pos + n - 1)
            have = slot_num_pages[slot]
            if slot_tables[slot] is not table:  # another table than the row holds: write it all
                slot_pages[slot] = 0
                slot_pages[slot, :len(table)] = table
                slot_tables[slot] = table
                slot_num_pages[slot] = len(table)
            elif len(table) != have:  # pages added since the slot's row was last written
                slot_pages[slot, have:len(table)] = table[have:]
                slot_num_pages[slot] = len(table)
            pos += n
            kv_lens.append(start + n)
            cu.append(pos)
        ns = len(seqs)
        sl = np.asarray(seq_slots, np.int64)
        batch["page_indices"][:ns] = slot_pages[sl]
        input_ids = batch["input_ids"]
        input_ids[:pos] = ids
        batch["positions"][:pos] = positions
        batch["slot_mapping"][:pos] = slots
        if pending_rows:
            rows = np.asarray(pending_rows)
            input_ids[rows] = 0
            seq_of_row = np.searchsorted(np.asarray(cu), rows, side="right")
            batch["input_slot"][rows] = sl[seq_of_row]
            self.num_device_inputs += len(pending_rows)
        batch["kv_lens"][:ns] = kv_lens
        batch["cu_q_lens"][1:ns + 1] = cu
        batch["logits_indices"][:ns] = np.asarray(cu) - 1 if ns else []
        for key, rows_of_slot in self._slot_samp.items():
            samp[key][:ns] = rows_of_slot[sl]
        samp["rng_pos"][:ns] = kv_lens
        samp["penalty_slot"][:ns] = seq_slots
        store = np.fromiter((seq.sample for seq in seqs), np.bool_, ns)
        samp["store_token"][:ns] = store
        penalties = self._slot_penalties[sl]
        samp["use_penalty"][:ns] = penalties
        samp["count_sampled"][:ns] = store & penalties
        mode = int(self._slot_mode[sl].max(initial=sampler.PLAIN))  # the modes nest: the highest serves all
        if penalties.any():
            for i in np.flatnonzero(penalties).tolist():
                seq = seqs[i]
                if seq.penalty_history is not None:
                    tokens, prompt_len = seq.penalty_history
                    padded = np.full((self.cfg.scheduler.max_model_len,), -1, np.int32)
                    padded[:len(tokens)] = tokens
                    if self.channel is not None:
                        from jaxengine.sharding import multihost
                        self.channel.send(multihost.OP_LOAD_HISTORY, seq_slots[i], prompt_len, 0, padded)
                    self._dispatch_load_history(seq_slots[i], padded, prompt_len)
        batch["cu_q_lens"][len(seqs) + 1:] = pos
        batch["num_seqs"][0] = len(seqs)
        program = out.num_steps > 1 or (self.decode_program and all(
            len(seq.token_ids) == 1 and seq.sample for seq in seqs))  # decode-only: row i is request i
        self.num_program_steps += program
        return seqs, (out.num_steps, program, self._run(batch, samp, mode=mode, broadcast=True,
                                                        num_steps=out.num_steps, program=program))

    def collect(self, handle: tuple) -> dict[str, SampleResult]:
        """Block until the step of `handle` is done; its sampled tokens by request id."""
        seqs, (num_steps, program, result) = handle
        if isinstance(result, concurrent.futures.Future):  # issued by the dispatching thread
            result = result.result()
        if program:  # [K, S, ...]: one SampleResult per iteration (K = 1: the decode program)
            hosts = [self._read_back(r) for r in np.asarray(jax.device_get(result))]
            if num_steps == 1:
                return {seq.request_id: self._result(hosts[0], i, seq) for i, seq in enumerate(seqs) if seq.sample}
            return {seq.request_id: [self._result(h, i, seq) for h in hosts]
                    for i, seq in enumerate(seqs) if seq.sample}
        host = self._read_back(result)
        tokens, logprobs, ranks = host["tokens"].tolist(), host["logprob"].tolist(), host["rank"].tolist()
        outputs = {}
        for i, seq in enumerate(seqs):
            if seq.sample:
                top = (list(zip(host["top_ids"][i].tolist(), host["top_logprobs"][i].tolist()))
                       if seq.params.logprobs else [])
                outputs[seq.request_id] = SampleResult(token=tokens[i], logprob=logprobs[i], rank=ranks[i],
                                                       top=top)
        return outputs

    @staticmethod
    def _result(host: dict[str, np.ndarray], i: int, seq: Any) -> SampleResult:
        top = (list(zip(host["top_ids"][i].tolist(), host["top_logprobs"][i].tolist()))
               if seq.params.logprobs else [])
        return SampleResult(token=int(host["tokens"][i]), logprob=float(host["logprob"][i]),
                            rank=int(host["rank"][i]), top=top)

    # All per-step inputs travel as one int32 and one float32 buffer: one host-to-device copy each
    # instead of twenty small ones (each costs tens of microseconds of fixed overhead on a GPU).
    def _layout(self, *key: int) -> tuple:
        """(t, s): the step's buffers, sampling knobs first; (s,): the sampling knobs alone."""
        if key not in self._layouts:
            s = key[-1]
            batch, samp = self._empty_arrays(key[0], s)
            groups = (("samp", samp), ("batch", batch)) if len(key) == 2 else (("samp", samp),)
            fields, n_int, n_float = [], 0, 0
            for group, arrays in groups:
                for name, arr in arrays.items():
                    is_float = arr.dtype == np.float32
                    fields.append((group, name, arr.shape, arr.dtype, is_float, n_float if is_float else n_int))
                    if is_float:
                        n_float += arr.size
                    else:
                        n_int += arr.size
            self._layouts[key] = (tuple(fields), n_int, n_float)
        return self._layouts[key]

    @staticmethod
    def _pack(batch: dict[str, np.ndarray], samp: dict[str, np.ndarray], layout: tuple):
        fields, n_int, n_float = layout
        ints, floats = np.empty((n_int,), np.int32), np.empty((n_float,), np.float32)
        groups = {"batch": batch, "samp": samp}
        for group, name, shape, dtype, is_float, off in fields:
            arr = groups[group][name]
            (floats if is_float else ints)[off:off + arr.size] = arr.ravel().astype(
                np.float32 if is_float else np.int32, copy=False)
        return ints, floats

    @staticmethod
    def _unpack(ints: jax.Array, floats: jax.Array, layout: tuple):
        fields = layout[0]
        groups: dict[str, dict[str, jax.Array]] = {"batch": {}, "samp": {}}
        for group, name, shape, dtype, is_float, off in fields:
            size = int(np.prod(shape))
            flat = (floats if is_float else ints)[off:off + size]
            arr = flat.reshape(shape)
            if dtype == np.bool_:
                arr = arr != 0
            elif dtype != arr.dtype:
                arr = arr.astype(dtype)  # uint32 seeds: same bits back
            groups[group][name] = arr
        return groups["batch"], groups["samp"]

    def _run(self, batch: dict[str, np.ndarray], samp: dict[str, np.ndarray], mode: int = 0,
             broadcast: bool = False, num_steps: int = 1, program: bool = False) -> dict[str, np.ndarray]:
        """program: run `multi_step` with k = num_steps (decode-only steps; implied by num_steps > 1)."""
        program = program or num_steps > 1
        t, s = batch["input_ids"].shape[0], batch["kv_lens"].shape[0]
        ints, floats = self._pack(batch, samp, self._layout(t, s))
        if broadcast and self.channel is not None:
            from jaxengine.sharding import multihost
            if program:
                self.channel.send(multihost.OP_MULTI_STEP, t, s, num_steps * len(sampler.MODES) + mode,
                                  ints, floats)
            else:
                self.channel.send(multihost.OP_STEP, t, s, mode, ints, floats)
        if program:
            return self._dispatch_multi_step(ints, floats, t, s, num_steps, mode)
        return self._dispatch(ints, floats, t, s, mode)

    # ------------------------------------------------------------------ the dispatching thread
    # RunnerConfig.dispatch_thread: every call that reads or replaces the device state (KV pages,
    # penalty state) runs, in order, on one worker thread, and `collect` waits for its future.
    # Why: on a GPU a jitted call returns only once the host has issued all of the program (the
    # K-step program: K launches of its loop body's command buffer, with their updates), so on
    # the calling thread the host's work between steps (collect, scheduling, packing) waits for
    # that.  (Earlier notes blamed a loop predicate read back each trip; the K loop's trip count
    # is known to XLA, which skips that read-back: `gpu_suite.sh loopcheck` times the return.)
    def _on_device(self, call):
        if self._worker is None:
            return call()
        last = self._last_future
        if last is not None and last.done() and last.exception() is not None:
            raise last.exception()  # a call nobody collects (a penalty history) failed
        self._last_future = self._worker.submit(call)
        return self._last_future

    def sync(self) -> None:
        """Wait until every device call handed to the dispatching thread has been issued (a no-op
        without one); then `kv_caches` and `penalty_state` are the latest."""
        if self._last_future is not None:
            self._last_future.result()

    def _dispatch_multi_step(self, ints: np.ndarray, floats: np.ndarray, t: int, s: int, num_steps: int,
                             mode: int):
        def call():
            ints_d, floats_d = self._put_inputs(ints, floats)
            self.kv_caches, self.penalty_state, out = self._multi_step(
                self.params, self.kv_caches, self.penalty_state, ints_d, floats_d, (t, s), num_steps, mode)
            return out
        return self._on_device(call)

    def _dispatch_load_history(self, slot: int, tokens: np.ndarray, prompt_len: int) -> None:
        args = (np.int32(slot), tokens, np.int32(prompt_len))

        def call():
            a = self._put_inputs(*(np.asarray(x) for x in args)) if self.mesh is not None else args
            self.penalty_state = self._load_history(self.penalty_state, *a)
        self._on_device(call)

    def _put_inputs(self, *arrays: np.ndarray) -> tuple[Any, ...]:
        if self.mesh is None:
            # numpy straight into the jitted call (its C++ dispatch copies them to the device), not
            # jax.device_put first: ~75 us less host time a step on CPU (scripts/host_overhead.py,
            # interleaved A/B).  On an H100 (1B, K = 1, host-bound) it was ahead in 5 of 6
            # same-call pairings at batch 1 and 64, but runs of one config there vary by 20-40%
            # (BENCHMARKS.md, sixth session).  The buffers are fresh each step (_pack): nothing
            # the device may still read is overwritten.
            return arrays
        from jaxengine import sharding
        return tuple(sharding.put_array(a, sharding.replicated(self.mesh)) for a in arrays)

    def _dispatch(self, ints: np.ndarray, floats: np.ndarray, t: int, s: int, mode: int = 0):
        def call():
            ints_d, floats_d = self._put_inputs(ints, floats)
            self.kv_caches, logits, samp_ints, samp_floats = self._forward(
                self.params, self.kv_caches, self.penalty_state["last_tokens"], ints_d, floats_d, (t, s))
            self.penalty_state, out = self._sample(logits, self.penalty_state, samp_ints, samp_floats, s, mode)
            return out
        return self._on_device(call)

    def _read_back(self, out) -> dict[str, np.ndarray]:
        """The sampled rows of one step (pack_samples' layout), from the device or already read."""
        packed = np.asarray(jax.device_get(out))
        k = (packed.shape[-1] - 3) // 2
        floats = packed[:, 2 + k:].view(np.float32)
        return {"tokens": packed[:, 0], "rank": packed[:, 1], "top_ids": packed[:, 2:2 + k],
                "logprob": floats[:, 0], "top_logprobs": floats[:, 1:]}
