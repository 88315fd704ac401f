"""GPU time of the decode forward program alone (no scheduler, no sampler, no host work), with the
weight-read floor and, on request, a kernel-by-kernel breakdown from a jax.profiler trace.

    python scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b --batch 1 64 --context 256 \
        --profile-dir /tmp/prof --hlo-dir /tmp/hlo --json out.json

What it runs is the program the engine runs for a decode-only step of `batch` requests (token
bucket = batch), each with `context` tokens already in the paged cache: models.<family>.forward
with the engine's attention kernel, params and KV pages donated like the runner does.  The
iterations are dispatched back to back (each depends on the last through the KV pages) and timed
together, so the figure is device time per step.  The floor is max(weights + KV bytes read +
KV bytes written) / copy bandwidth, FLOPs / matmul rate), both ceilings measured in the same run
(bench_latency.measure_ceilings).

--profile-dir traces a few more iterations and prints the kernels that ran, grouped by name, in
microseconds per step (from the Perfetto JSON jax.profiler writes); --hlo-dir writes the optimised
HLO of each program.  --layout picks the params layout (models.llama.LAYOUTS).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_latency import SHAPES, measure_ceilings  # noqa: E402


def decode_batch(batch: int, context: int, page_size: int, pages_per_seq: int, num_pages: int,
                 tokens: int | None = None, seqs: int | None = None) -> dict[str, np.ndarray]:
    """One decode token per request, padded like the runner pads: `tokens` rows (the token bucket)
    and `seqs` request rows, padding tokens writing to an out-of-range slot (dropped).  Request i
    owns pages [1 + i * pages_per_seq, ...) (page 0 spare)."""
    tokens, seqs = tokens or batch, seqs or batch
    rows = 1 + np.arange(batch)[:, None] * pages_per_seq + np.arange(pages_per_seq)[None, :]
    b = {"input_ids": np.zeros(tokens, np.int32), "positions": np.zeros(tokens, np.int32),
         "slot_mapping": np.full(tokens, num_pages * page_size, np.int32),
         "kv_lens": np.zeros(seqs, np.int32), "page_indices": np.zeros((seqs, pages_per_seq), np.int32),
         "cu_q_lens": np.full(seqs + 1, batch, np.int32), "num_seqs": np.array([batch], np.int32),
         "logits_indices": np.zeros(seqs, np.int32)}
    b["input_ids"][:batch] = (np.arange(batch) * 7919) % 1000
    b["positions"][:batch] = context
    b["slot_mapping"][:batch] = rows[:, context // page_size] * page_size + context % page_size
    b["kv_lens"][:batch] = context + 1
    b["page_indices"][:batch] = rows
    b["cu_q_lens"][:batch + 1] = np.arange(batch + 1)
    b["logits_indices"][:batch] = np.arange(batch)
    return b


def prefill_batch(prompt: int, page_size: int, pages_per_seq: int, num_pages: int, tokens: int,
                  seqs: int) -> dict[str, np.ndarray]:
    """One request's whole prompt as one chunk (positions 0..prompt-1, nothing cached before), padded
    like the runner pads: `tokens` rows, `seqs` request rows; one logits row (the last prompt token).
    The request owns pages [1, 1 + pages_per_seq)."""
    b = decode_batch(0, 0, page_size, pages_per_seq, num_pages, tokens, seqs)
    pos = np.arange(prompt)
    page = 1 + pos // page_size
    b["input_ids"][:prompt] = (pos * 7919) % 1000
    b["positions"][:prompt] = pos
    b["slot_mapping"][:prompt] = page * page_size + pos % page_size
    b["kv_lens"][0] = prompt
    b["page_indices"][0] = 1 + np.arange(pages_per_seq)
    b["cu_q_lens"][:] = prompt
    b["cu_q_lens"][0] = 0
    b["num_seqs"][0] = 1
    b["logits_indices"][0] = prompt - 1
    return b


def engine_buckets(batch: int, min_token_bucket: int = 8) -> tuple[int, int]:
    """(token bucket, request bucket) the runner uses for a decode step of `batch` requests with the
    default buckets: powers of two from min_token_bucket; requests padded to a multiple of 8."""
    t = max(min_token_bucket, 1 << (batch - 1).bit_length())
    return t, min(-(-batch // 8) * 8, t)


def step_cost(cfg, params_bytes: int, batch: int, context: int) -> tuple[float, float]:
    """(bytes that must move, FLOPs) of one decode step.  An untied embedding table is not streamed:
    the step gathers `batch` rows of it (before 2026-11-23's sixth session the whole table was
    counted, which put the 8B floor ~7% too high and its fractions ~7% too flattering)."""
    itemsize = np.dtype(cfg.dtype).itemsize
    kv_token = 2 * cfg.num_kv_heads * cfg.head_dim * itemsize * cfg.num_layers
    streamed = params_bytes
    if not cfg.tie_word_embeddings:
        streamed -= (cfg.vocab_size - batch) * cfg.hidden_size * itemsize
    moved = streamed + batch * ((context + 1) * kv_token + kv_token)  # weights, KV read, KV written
    flops = 2 * batch * (streamed / itemsize)  # every streamed weight once per token
    flops += 4 * batch * context * cfg.num_heads * cfg.head_dim * cfg.num_layers  # q.k and p.v
    return float(moved), float(flops)


def device_events(trace: str | list[dict]) -> list[dict]:
    """The kernel events ("X") of the newest trace under a trace dir, on the devices' stream lines
    (a list of events is returned as it is: read a trace once, then table it several ways)."""
    if not isinstance(trace, str):
        return trace
    trace_dir = trace
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    files += glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return []
    with gzip.open(sorted(files)[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {pid for pid, name in procs.items() if "gpu" in name.lower() or "/device:" in name.lower()}
    # A device has one line per CUDA stream plus derived lines (XLA Modules / XLA Ops) that repeat
    # the same time: count the stream lines only, where there are any.
    streams = {key for key, name in threads.items() if key[0] in device and "stream" in name.lower()}
    print(f"  trace lines: {sorted(set(n for k, n in threads.items() if k[0] in device))[:12]}")
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in device and "dur" in e
            and (not streams or (e["pid"], e.get("tid")) in streams)]


def kernel_table(trace: str | list[dict], steps: int) -> list[dict]:
    """Device kernels of the trace (a trace dir, or its events from device_events), by name:
    count and microseconds per step."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in device_events(trace):
        t = totals[e["name"]]
        t[0] += 1
        t[1] += float(e["dur"])
    rows = [{"kernel": k, "count_per_step": c / steps, "us_per_step": d / steps} for k, (c, d) in totals.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


def device_busy(trace: str | list[dict]) -> dict[str, float]:
    """Kernel time against the span from the first kernel's start to the last one's end, in us: the
    difference is time the device sat idle (waiting for the host, a read-back or a launch)."""
    ev = device_events(trace)
    if not ev:
        return {"busy_us": 0.0, "span_us": 0.0}
    busy = sum(float(e["dur"]) for e in ev)
    span = max(float(e["ts"]) + float(e["dur"]) for e in ev) - min(float(e["ts"]) for e in ev)
    return {"busy_us": busy, "span_us": span}


def device_gaps(trace: str | list[dict], top: int = 8) -> dict:
    """Where the device sat idle between kernels, on its busiest stream line: the total, by gap
    size (<2, 2-10, 10-100, >=100 us) and the kernel pairs (before -> after) with the most idle
    time after them, in us.  Launch gaps between back-to-back kernels show as many small gaps;
    waits on the host (a read-back, the next program's dispatch) as few large ones."""
    ev = device_events(trace)
    if not ev:
        return {"idle_us": 0.0, "by_size_us": {}, "pairs": []}
    lines = collections.Counter((e["pid"], e.get("tid")) for e in ev)
    line = lines.most_common(1)[0][0]
    ev = sorted((e for e in ev if (e["pid"], e.get("tid")) == line), key=lambda e: float(e["ts"]))
    sizes = {"<2": 0.0, "2-10": 0.0, "10-100": 0.0, ">=100": 0.0}
    pairs: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    end, prev = float(ev[0]["ts"]) + float(ev[0]["dur"]), ev[0]["name"]
    for e in ev[1:]:
        gap = float(e["ts"]) - end
        if gap > 0:
            key = "<2" if gap < 2 else "2-10" if gap < 10 else "10-100" if gap < 100 else ">=100"
            sizes[key] += gap
            p = pairs[(prev, e["name"])]
            p[0] += 1
            p[1] += gap
        end, prev = max(end, float(e["ts"]) + float(e["dur"])), e["name"]
    rows = sorted(({"before": a, "after": b, "count": c, "idle_us": g} for (a, b), (c, g) in pairs.items()),
                  key=lambda r: -r["idle_us"])
    return {"idle_us": sum(sizes.values()), "by_size_us": sizes, "pairs": rows[:top]}


def print_gaps(gaps: dict, per: float = 1.0, label: str = "step") -> None:
    sizes = ", ".join(f"{k} us {v / per:.0f}" for k, v in gaps["by_size_us"].items())
    print(f"  idle between kernels: {gaps['idle_us'] / per:.0f} us a {label} ({sizes})", flush=True)
    for r in gaps["pairs"]:
        print(f"    {r['idle_us'] / per:8.1f} us  x{r['count'] / per:5.1f}  {r['before'][:50]} -> {r['after'][:50]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["llama-3.1-8b"], choices=sorted(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--prefill", nargs="+", type=int, default=None,
                    help="instead of decode steps: one request's prompt of each of these lengths as one "
                         "chunk (the engine's prefill step, token bucket the next power of two), floor = "
                         "bench_latency's step bound for it (the roofline's)")
    ap.add_argument("--context", type=int, default=256, help="tokens already cached per request")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--min-token-bucket", type=int, default=8,
                    help="smallest token bucket (the runner's default 8: batch 1 runs an 8-row program)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--layout", default="fused", choices=["hf", "fused"],
                    help="params layout (models.llama.LAYOUTS; the engine's default is fused)")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--decode-attention", nargs="+", default=["general"], choices=["general", "fused"],
                    help="general: rope, KV scatter and ragged attention as the single-step program runs "
                         "them; fused: the decode attention that does all three (the multi-step "
                         "programs' path, ragged_paged_attention/decode.py); several: one run each")
    ap.add_argument("--residual-norm", nargs="+", default=["off"], choices=["off", "gpu", "reference"],
                    help="residual add + RMSNorm: the model's own ops (off), the Pallas kernel (gpu; the "
                         "engine's default on GPUs) or its jnp composition; several: one run each")
    ap.add_argument("--decode-matmul", nargs="+", default=["xla"], choices=["xla", "mgpu", "mgpu_norm", "mgpu_plain"],
                    help="the layers' matmuls: XLA's GEMMs or the Mosaic GPU decode_matmul kernels "
                         "(pallas_kernels/decode_matmul) with the residual adds and RMSNorms in their "
                         "epilogues where measured faster (mgpu), always (mgpu_norm) or never "
                         "(mgpu_plain); several (repeats allowed, for A/B/A): one run each")
    ap.add_argument("--profile-dir", default=None)
    ap.add_argument("--hlo-dir", default=None)
    ap.add_argument("--top", type=int, default=25, help="kernels listed per profile")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxengine.config import ModelConfig
    from jaxengine.models import get_model
    from jaxengine.pallas_kernels.ragged_paged_attention import get_attention, get_decode_attention
    from jaxengine.pallas_kernels.decode_matmul import get_dense
    from jaxengine.pallas_kernels.decode_matmul.gpu import pdl_default as mgpu_pdl
    from jaxengine.pallas_kernels.ragged_paged_attention.gpu_decode import (
        fused_combine_default as combine_in_kernel)
    from jaxengine.pallas_kernels.residual_norm import get_residual_norm

    ceil = measure_ceilings()
    dev = jax.devices()[0]
    report = {"device": dev.device_kind, "platform": jax.default_backend(), "jax": jax.__version__,
              "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "layout": args.layout, "context": args.context, "ceilings": ceil, "runs": []}
    print(f"device {dev.device_kind}, jax {jax.__version__}, copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"matmul {ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s, layout {args.layout}, "
          f"XLA_FLAGS={report['xla_flags']!r}")
    print("| model | batch | decode attention | residual norm | matmul | context | ms / step | floor ms | of floor | weights GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    attention = get_attention(args.attention)
    for name in args.model:
        cfg = ModelConfig.from_hf_config(SHAPES[name], dtype="bfloat16")
        model = get_model(cfg.architecture)
        params = model.init_params(cfg, jax.random.PRNGKey(0))
        params_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
        if args.layout == "fused":
            from jaxengine.sharding import map_layers
            params = map_layers(params, lambda layer: model.fuse_layer_weights(layer, cfg))
        sizes = args.prefill or args.batch
        for batch, mode, rn, dm in [(b, m, r, d) for b in sizes for m in args.decode_attention
                                    for r in args.residual_norm for d in args.decode_matmul]:
            prompt = batch if args.prefill else 0  # a prefill run's "batch" column is its prompt length
            context = 0 if prompt else args.context
            pages_per_seq = math.ceil(max(prompt, args.context + 1) / args.page_size)
            num_pages = 1 + (1 if prompt else batch) * pages_per_seq
            shape = (num_pages, args.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
            kv = [jnp.zeros(shape, cfg.dtype) for _ in range(cfg.num_layers)]
            tokens, seqs = engine_buckets(batch, args.min_token_bucket)
            if prompt:
                seqs = 8  # the runner's request rows: a multiple of 8
                inputs = jax.device_put(prefill_batch(prompt, args.page_size, pages_per_seq, num_pages, tokens, seqs))
            else:
                inputs = jax.device_put(decode_batch(batch, args.context, args.page_size, pages_per_seq,
                                                     num_pages, tokens, seqs))
            # a prefill chunk takes the general path (rope, KV scatter, ragged attention) whatever --decode-attention says
            decode_attention = get_decode_attention(args.attention) if mode == "fused" and not prompt else None
            residual_norm = None if rn == "off" else get_residual_norm(rn)
            dense = get_dense(dm)
            step = jax.jit(lambda p, kv, b: model.forward(p, cfg, b, kv, attention,
                                                          decode_attention=decode_attention,
                                                          residual_norm=residual_norm, dense=dense),
                           donate_argnums=(1,))
            compiled = step.lower(params, kv, inputs).compile()
            if args.hlo_dir:
                os.makedirs(args.hlo_dir, exist_ok=True)
                with open(os.path.join(args.hlo_dir, f"{name}-b{batch}-{args.layout}-{mode}-{rn}-{dm}.txt"), "w") as f:
                    f.write(compiled.as_text())
            for _ in range(3):
                logits, kv = compiled(params, kv, inputs)
            jax.block_until_ready(logits)
            t = time.perf_counter()
            for _ in range(args.iters):
                logits, kv = compiled(params, kv, inputs)
            jax.block_until_ready(logits)
            step_s = (time.perf_counter() - t) / args.iters
            if prompt:
                import types

                from bench_latency import step_bound_s
                floor_s = step_bound_s([(0, prompt)], types.SimpleNamespace(model=cfg), ceil)
                moved = flops = None
            else:
                moved, flops = step_cost(cfg, params_bytes, batch, args.context)
                floor_s = max(moved / ceil["copy_bytes_per_s"], flops / ceil["matmul_flops_per_s"])
            run = {"model": name, "batch": 1 if prompt else batch, "prefill": prompt, "decode_attention": mode, "residual_norm": rn, "decode_matmul": dm,
                   "mgpu_pdl": dm != "xla" and mgpu_pdl(), "decode_combine_in_kernel": combine_in_kernel("decode"),
                   "token_bucket": tokens, "step_ms": step_s * 1e3, "floor_ms": floor_s * 1e3,
                   "fraction_of_floor": floor_s / step_s, "bytes_per_step": moved, "flops_per_step": flops,
                   "params_bytes": params_bytes}
            label = f"prefill {prompt}" if prompt else batch
            print(f"| {name} | {label} | {mode} | {rn} | {dm} | {context} | {step_s * 1e3:.3f} | {floor_s * 1e3:.3f} | "
                  f"{100 * floor_s / step_s:.1f}% | {params_bytes / step_s / 1e9:.0f} |", flush=True)
            if args.profile_dir:
                d = os.path.join(args.profile_dir, f"{name}-{'p' if prompt else 'b'}{batch}-{args.layout}-{mode}-{rn}-{dm}")
                steps = 10
                with jax.profiler.trace(d, create_perfetto_trace=True):
                    for _ in range(steps):
                        logits, kv = compiled(params, kv, inputs)
                    jax.block_until_ready(logits)
                events = device_events(d)  # read the trace once
                rows = kernel_table(events, steps)
                run["kernels"] = rows
                total = sum(r["us_per_step"] for r in rows)
                print(f"  kernels of {name} b{batch}: {len(rows)} names, "
                      f"{sum(r['count_per_step'] for r in rows):.0f} launches and {total:.0f} us a step")
                for r in rows[:args.top]:
                    print(f"    {r['us_per_step']:9.1f} us  x{r['count_per_step']:5.1f}  {r['kernel'][:110]}")
                run["gaps"] = device_gaps(events)
                print_gaps(run["gaps"], per=steps)
            report["runs"].append(run)
            del kv, inputs, compiled
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
