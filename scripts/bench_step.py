"""Where a decode step's time goes outside the forward: the engine's own programs, timed on the device.

    python scripts/bench_step.py --model llama-3.2-1b llama-3.1-8b --batch 1 64 --context 256 \
        --steps 8 --profile-dir /tmp/prof --json out.json

bench_forward.py times the decode forward alone; bench_latency.py times the engine end to end.
Between them sit the sampler over the vocabulary, the multi-step loop and its bookkeeping (slots,
positions, the sampled tokens fed back), and the host.  This script builds the engine (`LLM`,
random weights of real shapes, `num_scheduler_steps=--steps`) and, on a decode batch laid out like
bench_forward's (each request `context` tokens into its own pages), times back to back:

- `sampler`: the engine's sampling program alone on float32 logits [request bucket, vocab],
  PLAIN (greedy/temperature), FILTER (+ penalties, filters) and FULL (+ top-k logprobs) — ms a call;
- `program k=1`: the decode program (forward + sampler in one program, no loop) — ms a token;
- `program k=K`: the multi-step program the engine runs at K — ms a token (call time / K).

Back-to-back calls keep the host out (each depends on the last through the donated KV pages), so
the figures are device time.  `program k=1` minus bench_forward's step is the sampler and the
bookkeeping inside the program; `program k=K` minus `program k=1` is what the loop adds (or saves)
per token; the engine's TPOT minus `program k=K` is the host and scheduling.  The floor per token is
bench_forward's (weights + KV bytes / copy bandwidth, FLOPs / matmul rate, measured in this run).
--profile-dir traces the k=K program and lists its kernels per token.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import decode_batch, device_events, device_gaps, kernel_table, print_gaps, step_cost  # noqa: E402
from bench_latency import SHAPES, measure_ceilings  # noqa: E402


def step_arrays(runner, batch: int, context: int) -> tuple[dict, dict]:
    """A decode step of `batch` requests as the runner pads it (its token and request buckets),
    each request `context` tokens into its own pages, greedy, no penalties."""
    t = runner.bucket_for(batch)
    s = runner.seqs_for(t)
    pages = math.ceil((context + 1) / runner.page_size)
    if 1 + batch * pages > runner.num_pages or pages > runner.pages_per_seq:
        raise ValueError(f"context {context} x batch {batch} does not fit the KV cache "
                         f"({runner.num_pages} pages, {runner.pages_per_seq} per request)")
    b, samp = runner._empty_arrays(t, s)
    mine = decode_batch(batch, context, runner.page_size, pages, runner.num_pages, t, s)
    for name, arr in mine.items():
        if name == "page_indices":
            b[name][:, :pages] = arr
        else:
            b[name][...] = arr
    return b, samp


def packed_step(runner, batch: int, context: int):
    """step_arrays and the same step packed as the runner hands it to its programs: (batch
    arrays, sampling arrays, (token bucket, request bucket), int buffer, float buffer)."""
    b, samp = step_arrays(runner, batch, context)
    t, s = b["input_ids"].shape[0], b["kv_lens"].shape[0]
    return (b, samp, (t, s), *runner._pack(b, samp, runner._layout(t, s)))


def _issued(x):
    """A device call's output; with the runner's dispatching thread (RunnerConfig.dispatch_thread)
    its future, waited for until the call has been issued (the multi-step loop: until it ran)."""
    return x.result() if isinstance(x, concurrent.futures.Future) else x


def _timed(fn, iters: int) -> float:
    import jax

    jax.block_until_ready(_issued(fn()))
    jax.block_until_ready(_issued(fn()))
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
        out = _issued(fn())
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def time_programs(runner, batch: int, context: int, steps: int, iters: int, only_k: bool = False) -> dict:
    """ms of the sampler programs (a call), the decode program k = 1 and the multi-step program
    k = steps (a token), back to back on the device; only_k: the multi-step program alone (NaN for
    the others: quick A/Bs of one setting a process)."""
    import jax
    import jax.numpy as jnp

    from jaxengine.runner import sampler

    runner.sync()  # the sampler below reads the penalty state the dispatching thread may replace
    b, samp, (t, s), ints, floats = packed_step(runner, batch, context)
    _, n_int, n_float = runner._layout(s)
    samp_ints, samp_floats = jnp.asarray(ints[:n_int]), jnp.asarray(floats[:n_float])
    vocab = runner.cfg.model.vocab_size
    logits = jax.random.normal(jax.random.PRNGKey(0), (s, vocab), jnp.float32) * 3.0
    out = {"token_bucket": t, "request_bucket": s}

    def run_sampler(mode):
        def call():
            runner.penalty_state, packed = runner._sample(logits, runner.penalty_state, samp_ints, samp_floats,
                                                          s, mode)
            return packed
        return call

    for mode in ("plain", "filter", "full"):
        out[f"sampler_{mode}_ms"] = (float("nan") if only_k else
                                     _timed(run_sampler(getattr(sampler, mode.upper())), iters) * 1e3)
    if only_k:
        out["program_k1_ms_per_token"] = float("nan")
    for k in sorted({steps} if only_k else {1, steps}):
        call = lambda k=k: runner._run(b, samp, mode=sampler.PLAIN, num_steps=k, program=True)  # noqa: E731
        out[f"program_k{k}_ms_per_token"] = _timed(call, max(1, iters // k)) * 1e3 / k
    runner.sync()
    return out


def loop_check(runner, batch: int, context: int, steps: int, iters: int = 8) -> dict:
    """The K-step program's compiled while loops and its call's return time.  XLA:GPU's while thunk
    runs a loop of known trip count without reading its predicate back to the host; without one it
    copies the predicate to the host and waits every trip, and the call returns only at the end.
    Calls the jitted program directly (not through the dispatching thread)."""
    import re

    import jax

    from jaxengine.runner import sampler

    runner.sync()
    b, samp, (t, s), ints, floats = packed_step(runner, batch, context)
    static = ((t, s), steps, sampler.PLAIN)
    text = runner._multi_step.lower(runner.params, runner.kv_caches, runner.penalty_state, ints, floats,
                                    *static).compile().as_text()
    loops = []
    for line in text.splitlines():
        if " while(" in line:
            m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            loops.append(int(m.group(1)) if m else None)
    ret, total = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.kv_caches, runner.penalty_state, out = runner._multi_step(
            runner.params, runner.kv_caches, runner.penalty_state, ints, floats, *static)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        ret.append(t1 - t0)
        total.append(time.perf_counter() - t0)
    ret_ms, total_ms = sorted(ret)[len(ret) // 2] * 1e3, sorted(total)[len(total) // 2] * 1e3
    print(f"  loop check b{batch}: while loops' known trip counts {loops} (None: unknown, read back "
          f"each trip); call returns after {ret_ms:.3f} ms of {total_ms:.3f} ms (median of {iters})",
          flush=True)
    return {"while_known_trip_counts": loops, "call_return_ms": ret_ms, "call_total_ms": total_ms}


def profile_full_sampler(runner, batch: int, context: int, trace: str, top: int,
                         mode_name: str = "FULL") -> list[dict]:
    """The FULL sampler (penalties, top-k/top-p filter, top-n logprobs), or the one mode_name
    names (FILTER: without the logprobs), under jax.profiler: its kernels per call, to say which
    part of it costs what."""
    import jax
    import jax.numpy as jnp

    from jaxengine.runner import sampler

    runner.sync()  # the penalty state is donated below: no program of the dispatching thread may hold it
    b, samp, (t, s), ints, floats = packed_step(runner, batch, context)
    _, n_int, n_float = runner._layout(s)
    samp_ints, samp_floats = jnp.asarray(ints[:n_int]), jnp.asarray(floats[:n_float])
    logits = jax.random.normal(jax.random.PRNGKey(0), (s, runner.cfg.model.vocab_size), jnp.float32) * 3.0
    calls = 3
    mode = getattr(sampler, mode_name)
    runner.penalty_state, packed = runner._sample(logits, runner.penalty_state, samp_ints, samp_floats, s,
                                                  mode)  # donated: the state comes back
    jax.block_until_ready(packed)
    with jax.profiler.trace(trace, create_perfetto_trace=True):
        for _ in range(calls):
            runner.penalty_state, packed = runner._sample(logits, runner.penalty_state, samp_ints, samp_floats,
                                                          s, mode)
        jax.block_until_ready(packed)
    rows = kernel_table(device_events(trace), calls)
    print(f"  kernels of the {mode_name} sampler, b{batch}, per call: {sum(x['count_per_step'] for x in rows):.0f} "
          f"launches, {sum(x['us_per_step'] for x in rows):.0f} us")
    for x in rows[:top]:
        print(f"    {x['us_per_step']:9.1f} us  x{x['count_per_step']:5.1f}  {x['kernel'][:110]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["llama-3.2-1b"], choices=sorted(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--context", type=int, default=256, help="tokens already cached per request")
    ap.add_argument("--steps", type=int, default=8, help="the engine's num_scheduler_steps (K)")
    ap.add_argument("--iters", type=int, default=48, help="tokens timed per figure")
    ap.add_argument("--kv-cache-gib", type=float, default=8.0)
    ap.add_argument("--decode-matmul", default="auto", choices=["auto", "xla", "mgpu", "mgpu_norm", "mgpu_plain"])
    ap.add_argument("--profile-sampler", choices=("full", "filter"), default="full",
                    help="which sampler mode --profile-dir traces (filter: top-k/top-p without logprobs)")
    ap.add_argument("--profile-dir", default=None,
                    help="trace the k = steps program and the FULL sampler and list their kernels")
    ap.add_argument("--max-logprobs", type=int, default=None,
                    help="the engine's max_logprobs (the FULL sampler's top-n logprobs; default the engine's)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--no-warmup", action="store_true",
                    help="compile only the programs timed (not every bucket): for quick A/Bs of XLA flags")
    ap.add_argument("--only-k", action="store_true",
                    help="time the k = steps program alone (no sampler or k = 1 figures): quick A/Bs of an "
                         "environment setting, one process each")
    ap.add_argument("--loop-check", action="store_true",
                    help="also report the K-step program's while loops (XLA's known trip count, which "
                         "lets XLA:GPU run the body without reading the loop predicate back) and how "
                         "long its call takes to return against how long it runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (k = 1 is timed anyway)")

    import jax

    from jaxengine import LLM
    from jaxengine.runner import sampler

    ceil = measure_ceilings()
    dev = jax.devices()[0]
    report = {"date": time.strftime("%Y-%m-%d"), "device": getattr(dev, "device_kind", str(dev)),
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "multi_step_unroll": os.environ.get("JAXENGINE_MULTI_STEP_UNROLL", ""),
              "l2_prefetch": os.environ.get("JAXENGINE_L2_PREFETCH", ""),
              "backend": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
              "context": args.context, "steps": args.steps, "ceilings": ceil, "runs": []}
    print(f"# device {report['device']}  jax {jax.__version__}  copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s"
          f"  bf16 matmul {ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s  context {args.context}  K {args.steps}",
          flush=True)
    print("| model | batch | buckets | sampler PLAIN ms | sampler FILTER ms | sampler FULL ms | program k=1 ms/token | "
          f"program k={args.steps} ms/token | floor ms/token | k={args.steps} of floor |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.model:
        shape = SHAPES[name]
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({**shape, "torch_dtype": "bfloat16"}, f)
            llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                      max_model_len=args.context + 64, max_num_seqs=max(args.batch),
                      kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
                      num_scheduler_steps=args.steps, decode_matmul=args.decode_matmul,
                      warmup=not args.no_warmup,
                      **({} if args.max_logprobs is None else {"max_logprobs": args.max_logprobs}))
        runner = llm.runner
        params_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(runner.params))
        for batch in args.batch:
            r = {"model": name, "batch": batch, "decode_matmul": runner.decode_matmul_impl,
                 "sampler_filter": runner.sampler_filter, "max_logprobs": runner.num_logprobs,
                 **time_programs(runner, batch, args.context, args.steps, args.iters, args.only_k)}
            moved, flops = step_cost(runner.cfg.model, params_bytes, batch, args.context)
            floor_ms = max(moved / ceil["copy_bytes_per_s"], flops / ceil["matmul_flops_per_s"]) * 1e3
            k_ms = r[f"program_k{args.steps}_ms_per_token"]
            r.update(floor_ms_per_token=floor_ms, fraction_of_floor=floor_ms / k_ms)
            print(f"| {name} | {batch} | {r['token_bucket']}/{r['request_bucket']} | {r['sampler_plain_ms']:.3f} | "
                  f"{r['sampler_filter_ms']:.3f} | {r['sampler_full_ms']:.3f} | {r['program_k1_ms_per_token']:.3f} | "
                  f"{k_ms:.3f} | {floor_ms:.3f} | {100 * floor_ms / k_ms:.1f}% |", flush=True)
            if args.loop_check:
                r["loop_check"] = loop_check(runner, batch, args.context, args.steps)
            if args.profile_dir:
                b, samp = step_arrays(runner, batch, args.context)
                trace = os.path.join(args.profile_dir, f"step-{name}-b{batch}")
                calls = 3
                with jax.profiler.trace(trace, create_perfetto_trace=True):
                    for _ in range(calls):
                        out = _issued(runner._run(b, samp, mode=sampler.PLAIN, num_steps=args.steps, program=True))
                    jax.block_until_ready(out)
                events = device_events(trace)
                rows = kernel_table(events, calls * args.steps)
                r["kernels"] = rows
                print(f"  kernels of the k={args.steps} program, {name} b{batch}, per token: "
                      f"{sum(x['count_per_step'] for x in rows):.0f} launches, "
                      f"{sum(x['us_per_step'] for x in rows):.0f} us")
                for x in rows[:args.top]:
                    print(f"    {x['us_per_step']:9.1f} us  x{x['count_per_step']:5.1f}  {x['kernel'][:110]}")
                r["gaps"] = device_gaps(events)
                print_gaps(r["gaps"], per=calls * args.steps, label="token")
                r["full_sampler_kernels"] = profile_full_sampler(runner, batch, args.context,
                                                                 os.path.join(trace, "sampler"), args.top,
                                                                 args.profile_sampler.upper())
                r["profiled_sampler"] = args.profile_sampler.upper()
            report["runs"].append(r)
        del llm, runner
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
