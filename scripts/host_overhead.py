"""Host time of an engine step, by part, with an interleaved A/B of how the step's inputs reach the
device: `jax.device_put` first, or numpy straight into the jitted call (the runner's way since
the sixth session; on an H100 ahead in 1B K = 1 runs, but those vary by 20-40%: BENCHMARKS.md).

    python scripts/host_overhead.py --batch 1 64 [--decode-program] [--json out.json]

A tiny Llama checkpoint (tests/tiny_checkpoints.py, built in a temp dir) decodes `--tokens` tokens
for each batch of requests; each part (scheduler, dispatch, collect less its wait for the device,
result processing) is timed by wrapping it.  Prints medians over `--rounds` interleaved rounds.
CPU figures move by ~10% between runs on a busy machine: compare within one run only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--decode-program", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax

    import tiny_checkpoints
    from jaxengine import LLM, SamplingParams

    path = tiny_checkpoints.make_checkpoint(tempfile.mkdtemp(), "llama", seed=0)
    report = {"backend": jax.default_backend(), "jax": jax.__version__, "argv": sys.argv, "runs": []}
    for batch in args.batch:
        llm = LLM(path, dtype="float32", max_model_len=512, max_num_seqs=max(batch, 8),
                  max_num_batched_tokens=512, kv_cache_memory_bytes=64 << 20, use_tqdm_on_load=False,
                  skip_tokenizer_init=True, decode_program=args.decode_program)
        runner, core = llm.runner, llm.engine
        spent: dict[str, float] = collections.defaultdict(float)

        def timed(obj, name, wait=None):
            fn = getattr(obj, name)

            def wrapper(*a, **k):
                if wait is not None:  # the device's time, kept out of the host part
                    t = time.perf_counter()
                    wait(*a)
                    spent[name + "_wait"] += time.perf_counter() - t
                t = time.perf_counter()
                out = fn(*a, **k)
                spent[name] += time.perf_counter() - t
                return out
            setattr(obj, name, wrapper)

        timed(runner, "dispatch")
        timed(runner, "collect", wait=lambda handle: jax.block_until_ready(handle[1][-1]))
        timed(core.scheduler, "schedule")
        timed(core, "_process")
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
        prompts = [{"prompt_token_ids": [5 + i, 6, 7, 8]} for i in range(batch)]
        llm.generate(prompts, params, use_tqdm=False)  # warm
        inputs = {"device_put": lambda *a: jax.device_put(a), "numpy": lambda *a: a}
        rows = collections.defaultdict(list)
        for _ in range(args.rounds):
            for mode, put in inputs.items():
                runner._put_inputs = put
                spent.clear()
                steps, t = core.num_steps, time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                n = core.num_steps - steps
                rows[mode].append({"step_us": 1e6 * (time.perf_counter() - t) / n,
                                   **{f"{k}_us": 1e6 * v / n for k, v in spent.items()}})
        for mode, runs in rows.items():
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            report["runs"].append({"batch": batch, "inputs": mode, **med})
            print(f"batch {batch:3d}  {mode:10s}  " + "  ".join(f"{k} {v:6.0f}" for k, v in sorted(med.items())),
                  flush=True)
        del llm
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
