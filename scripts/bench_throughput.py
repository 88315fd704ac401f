"""Offline throughput: LLM.generate over N requests, like `vllm bench throughput`.

    python scripts/bench_throughput.py --model llama-3.1-8b --num-prompts 512 --dataset sharegpt-like
    python scripts/bench_throughput.py --model llama-3.2-1b --num-prompts 256 --dataset fixed \
        --input-len 1024 --output-len 128

Datasets (seeded, synthetic token ids; no download):
- "sharegpt-like": input and output lengths drawn from log-normal distributions fitted to the
  ShareGPT conversations that vLLM's benchmark uses (input median ~230 tokens, output median ~200,
  both long-tailed), clipped to [4, 2048] input and [4, 1024] output.  The exact parameters are
  below (LOGNORMAL_*) so every run draws the same lengths for a given --seed.
- "fixed": every request --input-len in, --output-len out.
All requests are greedy with ignore_eos, so each produces exactly its drawn output length.
Prints requests/s, total tok/s and output tok/s, plus the roofline fraction (see bench_latency.py),
and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from bench_latency import SHAPES, StepLog, dispatch_breakdown, measure_ceilings, step_bound_s  # noqa: E402

# log-normal (mu, sigma) of token counts, ShareGPT-like
LOGNORMAL_INPUT = (5.45, 1.05)
LOGNORMAL_OUTPUT = (5.3, 0.95)


def draw_lengths(dataset: str, n: int, seed: int, input_len: int, output_len: int) -> list[tuple[int, int]]:
    if dataset == "fixed":
        return [(input_len, output_len)] * n
    rng = np.random.default_rng(seed)
    ins = np.clip(rng.lognormal(*LOGNORMAL_INPUT, n), 4, 2048).astype(int)
    outs = np.clip(rng.lognormal(*LOGNORMAL_OUTPUT, n), 4, 1024).astype(int)
    return list(zip(ins.tolist(), outs.tolist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--dataset", default="sharegpt-like", choices=["sharegpt-like", "fixed"])
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="step token budget (default: the engine's, 8192 on a GPU, 2048 elsewhere)")
    ap.add_argument("--kv-cache-gib", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-scheduler-steps", type=int, default=1, help="multi-step decoding (K)")
    ap.add_argument("--token-buckets", default=None,
                    help="comma-separated token buckets (default: powers of two; see bucket_waste.py)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax

    from jaxengine import LLM, SamplingParams

    ceil = measure_ceilings()
    lengths = draw_lengths(args.dataset, args.num_prompts, args.seed, args.input_len, args.output_len)
    max_len = max(i + o for i, o in lengths) + 16
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({**SHAPES[args.model], "torch_dtype": "bfloat16"}, f)
        t0 = time.perf_counter()
        llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=max_len,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30), use_tqdm_on_load=False,
                  num_scheduler_steps=args.num_scheduler_steps,
                  token_buckets=[int(b) for b in args.token_buckets.split(",")] if args.token_buckets else None)
        startup_s = time.perf_counter() - t0
        llm.wait_for_compilation()  # the buckets compiled in the background: time at the full budget
        full_budget_s = time.perf_counter() - t0
    log = StepLog(llm.runner, llm.engine.scheduler)
    rng = np.random.default_rng(args.seed + 1)
    vocab = llm.config.model.vocab_size
    prompts = [{"prompt_token_ids": rng.integers(0, vocab, i).tolist()} for i, _ in lengths]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in lengths]
    llm.generate(prompts[:4], [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)] * 4,
                 use_tqdm=False)  # warm the host paths
    log.clear()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    end = time.perf_counter()
    total_s = end - t
    n_in = sum(i for i, _ in lengths)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(o for _, o in lengths)
    bound = sum(step_bound_s(s, llm.config, ceil) for s in log.steps)
    dev = jax.devices()[0]
    report = {"date": time.strftime("%Y-%m-%d"), "device": getattr(dev, "device_kind", str(dev)),
              "jax": jax.__version__, "model": args.model, "dataset": args.dataset, "num_prompts": args.num_prompts,
              "input_tokens": n_in, "output_tokens": n_out, "total_s": total_s,
              "requests_per_s": args.num_prompts / total_s, "total_tok_s": (n_in + n_out) / total_s,
              "output_tok_s": n_out / total_s, "num_steps": len(log.steps),
              "num_dispatches": len(log.dispatches),
              "multi_step_dispatches": sum(k > 1 for k in log.dispatches), "roofline_s": bound,
              "roofline_fraction": bound / total_s, "startup_s": startup_s, "full_budget_s": full_budget_s,
              "max_num_batched_tokens": llm.config.scheduler.max_num_batched_tokens, "ceilings": ceil,
              "preemptions": llm.engine.scheduler.num_preemptions,
              "attention": llm.runner.attention_impl, "num_scheduler_steps": args.num_scheduler_steps,
              "token_buckets": list(llm.runner.buckets),
              "breakdown": dispatch_breakdown(log, llm.config, ceil, end)}
    print(f"# {report['device']} jax {jax.__version__} {args.model} {args.dataset} x{args.num_prompts}: "
          f"{report['requests_per_s']:.2f} req/s, {report['total_tok_s']:.0f} total tok/s, "
          f"{report['output_tok_s']:.0f} output tok/s, roofline {100 * report['roofline_fraction']:.1f}% "
          f"({len(log.steps)} steps in {len(log.dispatches)} dispatches, {report['multi_step_dispatches']} of them "
          f"multi-step; {report['preemptions']} preemptions, startup {startup_s:.0f}s)")
    for r in report["breakdown"]:
        print(f"#   {r['class']:14s} {r['dispatches']:4d} dispatches {r['steps']:5d} steps  "
              f"{1e3 * r['wall_s']:9.1f} ms  bound {1e3 * r['bound_s']:9.1f} ms  ({100 * r['fraction']:.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
