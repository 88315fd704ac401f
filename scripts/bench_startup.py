"""Start-up time: from `LLM(...)` to the first generated token, with a cold and a warm cache.

    python scripts/bench_startup.py --model llama-3.1-8b --json startup.json

Runs the same start twice in fresh processes sharing one new compilation-cache directory: the first
compiles every bucket (cold), the second takes them from JAX's persistent cache (warm).  Each run
reports the seconds to construct the engine (load + KV allocation + warm-up compile of the
buckets up to 2048 tokens), the seconds to the first token of a 128-token prompt, the seconds until
the bigger buckets compiled in the background are ready (the engine at its full token budget), the
number of programs lowered before the first token and in the background, and the persistent cache's
hits and misses.  Weights are random (load_format="dummy").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, sys, tempfile, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from bench_latency import SHAPES
from jaxengine import LLM, SamplingParams
from jaxengine.runner.compile_watch import num_background_compilations, num_compilations, persistent_cache_stats
import jax
shape, max_tokens, mnbt = SHAPES[sys.argv[2]], 8, int(sys.argv[3]) or None
d = tempfile.mkdtemp()
json.dump({**shape, "torch_dtype": "bfloat16"}, open(os.path.join(d, "config.json"), "w"))
t1 = time.perf_counter()
llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=2048,
          max_num_seqs=64, max_num_batched_tokens=mnbt, kv_cache_memory_bytes=int(float(sys.argv[4]) * 2**30) or None,
          use_tqdm_on_load=False)
t2 = time.perf_counter()
llm.generate({"prompt_token_ids": list(range(1, 129))}, SamplingParams(temperature=0.0, max_tokens=1),
             use_tqdm=False)
t3 = time.perf_counter()
lowered = num_compilations()
llm.wait_for_compilation()
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "engine_s": t2 - t1, "first_token_s": t3 - t1,
                  "full_budget_s": t4 - t1, "max_num_batched_tokens": llm.config.scheduler.max_num_batched_tokens,
                  "background_programs": num_background_compilations(),
                  "phases": llm.startup_phases, "warmup_calls": llm.runner.warmup_times,
                  "precompile_s": llm.runner.precompile_s, "precompile_lower_s": llm.runner.precompile_lower_s,
                  "compile_threads": llm.runner.compile_threads(),
                  "buckets": len(llm.runner.buckets), "programs_lowered": lowered,
                  "device": getattr(jax.devices()[0], "device_kind", "cpu"), "jax": jax.__version__,
                  **persistent_cache_stats()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--max-num-batched-tokens", type=int, default=0,
                    help="0: the engine's default (8192 on a GPU, the buckets above 2048 compiled in the "
                         "background after LLM() returns; 2048 elsewhere)")
    ap.add_argument("--kv-cache-gib", type=float, default=4.0,
                    help="KV cache size; 0: the engine's default (gpu_memory_utilization 0.9 of what the "
                         "weights leave: the compile pool's autotuning then has the least memory)")
    ap.add_argument("--also-warm", nargs="*", default=[], metavar="VAR=VALUE",
                    help="after the warm run, one more warm run per setting with that environment variable set "
                         "(e.g. JAXENGINE_BACKGROUND_COMPILE_ABOVE=256)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    report = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "runs": {}}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "JAXENGINE_COMPILATION_CACHE_DIR": cache}
        for setting in args.also_warm:
            if "=" not in setting:
                ap.error(f"--also-warm takes VAR=VALUE, got {setting!r}")
        runs = [("cold", {}), ("warm", {})] + [(f"warm {s}", dict([s.split("=", 1)])) for s in args.also_warm]
        for label, extra in runs:
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, here, args.model, str(args.max_num_batched_tokens),
                                  str(args.kv_cache_gib)], env={**env, **extra}, capture_output=True, text=True,
                                 cwd=cache)  # not the checkout: its jaxengine/ would shadow the installed one
            if out.returncode != 0:
                sys.exit(f"{label} run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["process_s"] = time.perf_counter() - t
            report["runs"][label] = r
            print(f"{label} {r['device']}: LLM() {r['engine_s']:6.1f} s, first token at {r['first_token_s']:6.1f} s, "
                  f"all {r['buckets']} buckets (budget {r['max_num_batched_tokens']}) at {r['full_budget_s']:6.1f} s, "
                  f"{r['programs_lowered']} programs lowered before the first token and "
                  f"{r['background_programs']} in the background, persistent cache "
                  f"{r['persistent_cache_hits']} hits / {r['persistent_cache_misses']} misses", flush=True)
    for label, r in report["runs"].items():
        slow = sorted(r["warmup_calls"], key=lambda c: -c[3])[:6]
        print(f"{label} phases: import {r['import_s']:.1f} s, " + ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items())
              + f"; of the warm-up: compile pool ({r['compile_threads']} threads) {r['precompile_s']:.1f} s "
              + f"(lowering {r['precompile_lower_s']:.1f} s of it), "
              + f"calls {sum(c[3] for c in r['warmup_calls']):.1f} s, slowest: "
              + ", ".join(f"{p} t={t} mode={m} {s:.1f} s" for p, t, m, s in slow), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
