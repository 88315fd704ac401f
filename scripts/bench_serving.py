"""Serving benchmark, like `vllm bench serve`: streaming clients against a local OpenAI-compatible server.

    python scripts/bench_serving.py --model my-model --num-prompts 512 --max-concurrency 64 \
        --duration-s 60 --result-file bench.json

Requests arrive as a Poisson process at --request-rate per second (inf: all at once), and at most
--max-concurrency of them are in flight.  Each one streams a /v1/completions request and records
time to first token (TTFT), the gaps between streamed chunks (ITL), time per output token after the
first (TPOT) and its end-to-end latency.  Token counts come from the server's usage report.

Synthetic prompts (seeded, so two runs send the same requests): prompt i has a word count drawn
uniformly from [input_len * (1 - range_ratio), input_len * (1 + range_ratio)], words drawn uniformly
from a fixed 64-word list, prefixed by "i:" so that prompts do not share a prefix beyond a word or
two; its output length is drawn likewise around --output-len and enforced with ignore_eos, so every
request generates exactly that many tokens (unless it hits max_model_len).

Bounded: at most --num-prompts requests and --duration-s seconds (no request starts after that;
in-flight ones finish).  Only talks to 127.0.0.1 / localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import statistics
import sys
import time
import urllib.parse

import httpx

WORDS = ("the quick brown fox jumps over lazy dog hello world a tiny model for tests reads prompts writes "
         "answers and says goodbye what is two plus four time space light river stone cloud green blue "
         "red yellow seven eight nine ten city road house tree bird fish water fire earth wind music "
         "paper glass iron gold silver").split()


@dataclasses.dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = dataclasses.field(default_factory=list)
    error: str = ""


def make_requests(n: int, input_len: int, output_len: int, range_ratio: float, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)

    def draw(mean: int) -> int:
        return max(1, rng.randint(int(mean * (1 - range_ratio)), int(math.ceil(mean * (1 + range_ratio)))))

    reqs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(draw(input_len))]
        reqs.append((f"{i}: " + " ".join(words), draw(output_len)))
    return reqs


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    res = Result(ok=False)
    start = last = time.perf_counter()
    first = None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"]:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
        res.latency_s = time.perf_counter() - start
        res.ok = first is not None
    except httpx.HTTPError as e:
        res.error = repr(e)
    return res


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    v = sorted(x * scale for x in values)
    return {"mean": statistics.fmean(v), "median": statistics.median(v),
            "p99": v[min(len(v) - 1, int(math.ceil(0.99 * len(v))) - 1)]}


async def run(args: argparse.Namespace) -> dict:
    requests = make_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed)
    rng = random.Random(args.seed + 1)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or len(requests), max_keepalive_connections=None)
    sem = asyncio.Semaphore(args.max_concurrency or len(requests))
    results: list[Result] = []

    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.request_timeout_s)) as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]

        async def limited(prompt: str, max_tokens: int) -> None:
            try:
                results.append(await one_request(http, model, prompt, max_tokens))
            finally:
                sem.release()

        t0 = time.perf_counter()
        tasks = []
        for prompt, max_tokens in requests:
            await sem.acquire()  # an arrival waits for a free slot, as in vllm bench serve
            if time.perf_counter() - t0 > args.duration_s:
                sem.release()
                break
            tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
            else:
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - t0
        metrics_text = (await http.get("/metrics")).text if args.scrape_metrics else ""

    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary = {
        "base_url": args.base_url, "model": model,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",  # strict JSON
        "max_concurrency": args.max_concurrency, "seed": args.seed, "input_len": args.input_len,
        "output_len": args.output_len, "range_ratio": args.range_ratio,
        "num_sent": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s,
        "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": out_tokens,
        "request_throughput_per_s": len(ok) / duration_s,
        "output_throughput_tok_per_s": out_tokens / duration_s,
        "total_token_throughput_tok_per_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration_s,
        "ttft_ms": _stats([r.ttft_s for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in ok for x in r.itl_s]),
        "e2e_latency_ms": _stats([r.latency_s for r in ok]),
    }
    for line in metrics_text.splitlines():
        for name in ("jaxengine:kv_cache_usage_perc", "jaxengine:num_free_kv_cache_pages",
                     "jaxengine:num_kv_cache_pages", "jaxengine:num_requests_running",
                     "jaxengine:num_requests_waiting", "jaxengine:prefix_cache_hit_rate"):
            if line.startswith(name + "{"):
                summary.setdefault("server_after", {})[name] = float(line.rsplit(" ", 1)[1])
    return summary


def print_table(s: dict) -> None:
    w = 44
    print("=" * (w + 16))
    print(f"{'Serving benchmark':^{w + 16}}")
    print("=" * (w + 16))
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"), ("Total input tokens", s["total_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput_per_s']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput_tok_per_s']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput_tok_per_s']:.2f}")]
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st)"),
                       ("itl_ms", "Inter-token Latency"), ("e2e_latency_ms", "End-to-end Latency")):
        rows.append((f"-- {title} --", None))
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize()} {key.split('_ms')[0].upper()} (ms)", f"{s[key][stat]:.2f}"))
    for name, value in s.get("server_after", {}).items():
        rows.append((f"after: {name.split(':')[1]}", value))
    for k, v in rows:
        print(f"{k:<{w}}" + ("" if v is None else f"{v:>16}"))
    print("=" * (w + 16))
    for e in s["errors"]:
        print("error:", e)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (127.0.0.1 only)")
    p.add_argument("--model", default=None, help="model name; default: the server's first")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=200, help="most requests to send")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrival rate (req/s)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--duration-s", type=float, default=60.0, help="stop sending new requests after this")
    p.add_argument("--input-len", type=int, default=32, help="mean prompt length in words")
    p.add_argument("--output-len", type=int, default=64, help="mean output length in tokens")
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths are uniform in mean*(1 +- ratio)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--no-scrape-metrics", dest="scrape_metrics", action="store_false",
                   help="do not read /metrics after the run")
    p.add_argument("--result-file", default=None, help="write the summary as JSON here")
    args = p.parse_args(argv)
    host = urllib.parse.urlparse(args.base_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        p.error(f"--base-url must point at this machine (127.0.0.1), got {host}")
    if not 0 <= args.range_ratio < 1:
        p.error("--range-ratio must be in [0, 1)")
    summary = asyncio.run(run(args))
    print_table(summary)
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
