"""Padding waste of token-bucket sets, measured on the scheduler's real step sizes (no device).

    python scripts/bucket_waste.py --json buckets.json [--num-prompts 512] [--max-num-seqs 256]

Runs the engine's own Scheduler and KVCacheManager over a workload (tokens are fed back at once, no
model), records every step's token count, and for each candidate bucket set reports: programs to
compile (= buckets), padded token rows as a share of real ones, and a modelled cost of the padding
on an H100 for the 8B shape: a step's matmul time is max(2 * padded_tokens * params / matmul rate,
weight bytes / HBM rate) (attention and the KV write skip padding rows, so they do not count).
Below the ridge point (~260 tokens for bf16 on an H100) padding is free in this model; on the real
GPU small buckets still matter because XLA's GEMMs stream weights slower at M = 64 than at M = 1
(BENCHMARKS.md), so the sets below keep every power of two up to 256.

Workloads: "sharegpt-like" (bench_throughput.py's seeded length mix, all requests at once, the
offline case) and "latency" (bench_latency.py's fixed 128/128 batches of 1, 8, 32, 64, 128, 256).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_throughput import draw_lengths  # noqa: E402

from jaxengine.config import SchedulerConfig  # noqa: E402
from jaxengine.engine.kv_cache_manager import KVCacheManager  # noqa: E402
from jaxengine.engine.request import Request  # noqa: E402
from jaxengine.engine.scheduler import Scheduler  # noqa: E402
from jaxengine.sampling_params import SamplingParams  # noqa: E402

# Llama-3.1-8B: parameters in the matmuls per token (layers + lm_head), bf16; H100 ceilings measured
# 2026-11-23 (BENCHMARKS.md): 2.95 TB/s copy, 775 TFLOP/s bf16 matmul.
MATMUL_PARAMS_8B = 32 * (4096 * 128 * (32 + 2 * 8) + 32 * 128 * 4096 + 3 * 4096 * 14336) + 128256 * 4096
HBM, MXU = 2.95e12, 775e12


def step_sizes(lengths: list[tuple[int, int]], max_num_seqs: int, max_num_batched_tokens: int,
               num_pages: int, page_size: int = 16) -> list[int]:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_model_len=4096)
    sched = Scheduler(cfg, KVCacheManager(num_pages, page_size, enable_prefix_caching=True))
    rng = np.random.default_rng(0)
    for i, (n_in, n_out) in enumerate(lengths):
        prompt = rng.integers(3, 32000, n_in).tolist()
        sched.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=n_out, ignore_eos=True),
                                  seed=0, max_total_tokens=4096))
    sizes = []
    while sched.has_unfinished():
        out = sched.schedule()
        if out.empty:
            raise RuntimeError("scheduler made no progress")
        sizes.append(sum(len(s.token_ids) for s in out.seqs))
        sched.update(out, {s.request_id: 7 for s in out.seqs if s.sample})
    return sizes


def bucket_of(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(n)


def matmul_time(tokens: int) -> float:
    return max(2 * tokens * MATMUL_PARAMS_8B / MXU, 2 * MATMUL_PARAMS_8B / HBM)


def evaluate(sizes: list[int], buckets: list[int]) -> dict:
    padded = [bucket_of(n, buckets) for n in sizes]
    real_t = sum(matmul_time(n) for n in sizes)
    pad_t = sum(matmul_time(p) for p in padded)
    return {"buckets": buckets, "programs": len(buckets),
            "padding_rows_pct": 100 * (sum(padded) - sum(sizes)) / sum(sizes),
            "modelled_matmul_s": pad_t, "modelled_padding_cost_pct": 100 * (pad_t - real_t) / real_t}


def candidate_sets(max_tokens: int) -> dict[str, list[int]]:
    pow2 = [8 << i for i in range(20) if (8 << i) < max_tokens] + [max_tokens]
    small = [b for b in pow2 if b <= 256]
    large = [b for b in pow2 if b > 256]
    mids = sorted({b * 3 // 2 for b in [256] + large[:-1] if b * 3 // 2 < max_tokens})
    sets = {"powers of two (default)": pow2,
            "powers of two + 1.5x above 256": sorted(set(pow2) | set(mids)),
            "powers of two + 1.5x of the top two": sorted(set(pow2) | set(mids[-2:]))}
    sets["_small"] = small  # (reported, not a set)
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-pages", type=int, default=20 * 2**30 // (32 * 16 * 2 * 8 * 128 * 2),
                    help="KV pages (default: 20 GiB of 8B KV in pages of 16 tokens)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    mnbt = args.max_num_batched_tokens
    workloads = {
        "sharegpt-like": step_sizes(draw_lengths("sharegpt-like", args.num_prompts, 0, 0, 0),
                                    args.max_num_seqs, mnbt, args.num_pages),
        "latency 128/128": [n for b in (1, 8, 32, 64, 128, 256)
                            for n in step_sizes([(128, 128)] * b, max(b, 1), mnbt, args.num_pages)],
    }
    sets = candidate_sets(mnbt)
    small = sets.pop("_small")
    # greedy: the one extra bucket (a multiple of 128 above 256) that cuts the modelled cost most
    all_sizes = [n for s in workloads.values() for n in s]
    base = sets["powers of two (default)"]
    best = min((sorted(set(base) | {b}) for b in range(384, mnbt, 128) if b not in base),
               key=lambda bs: evaluate(all_sizes, bs)["modelled_matmul_s"])
    sets["powers of two + best single extra"] = best
    report = {"args": vars(args), "small_buckets_kept": small, "workloads": {}}
    print("| workload | steps | bucket set | programs | padding rows | modelled padding cost |")
    print("| --- | --- | --- | --- | --- | --- |")
    for wname, sizes in workloads.items():
        report["workloads"][wname] = {"steps": len(sizes), "tokens": sum(sizes), "sets": {}}
        for sname, buckets in sets.items():
            r = evaluate(sizes, buckets)
            report["workloads"][wname]["sets"][sname] = r
            print(f"| {wname} | {len(sizes)} | {sname}: {buckets} | {r['programs']} | "
                  f"{r['padding_rows_pct']:.1f}% | {r['modelled_padding_cost_pct']:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
