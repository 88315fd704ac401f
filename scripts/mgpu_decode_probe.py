"""Where the Mosaic GPU decode kernel (gpu_decode_mgpu) stops on a GPU, in one device call.

    python3 scripts/mgpu_decode_probe.py [--timeout 150] [--out probe.json] [--dump DIR]

Its first compiled run (twentieth session, H100) printed nothing for 4+ minutes and no test
finished: a hang or a very slow compile, not told apart.  This runs the kernel at growing probe
levels (gpu_decode_mgpu._attend(probe=)), each merge in its own subprocess under a timeout, and
prints what each step took:
    level 0  q's TMA copy, then the output / merge paths (no K/V traffic)
    level 1  + the ring's first K/V copies, awaited (no compute)
    level 2  + the block loop (QK wgmma, softmax, P^T store, refills) without the PV wgmma
    level 3r the kernel with PV's A operand V^T transposed through registers (v_via_registers: the
             fallback should the transposed smem operand be at fault; run before 3)
    level 3  the kernel (checked against the jnp reference, then timed)
for merges "one split", "combine" and "cluster" on a small batch (3 requests + 2 padding rows,
GQA 4, head_dim 128, page 16, 2 splits) and then, at level 3, issue 3's shape (8B, b8 ctx 2k, the
default config).  Each step prints a line before it starts ("lower", "compile", "run") and after
(seconds), so a timeout names the step: "compile" = a slow compile, "run" = a hang.  Mosaic GPU
compiles its kernels when XLA compiles the program or at the first run: the subprocess runs with
MOSAIC_GPU_DUMP_PTXAS=1, whose ptxas report lines show that the kernel compiled.  A level that
times out skips the higher levels of its merge.  --dump DIR writes each subprocess's whole output
there (DIR/SHAPE_MERGE.log), the one-split case's with Mosaic's PTX and SASS of every level
(MOSAIC_GPU_DUMP_PTX / _SASS; not MOSAIC_GPU_DUMP_TO, which adds every MLIR pass).  The last
line is "ALL PASSED" when every level-3 case ran and matched the reference (then run
gpu_suite.sh mgpudecode: the compiled tests and the benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MERGES = ("one", "combine", "cluster")


def _say(*parts):
    print("STEP", *parts, flush=True)


def _case(shape: str):
    """(args, sm_scale, kwargs for _attend) of a case, and the reference output."""
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from test_ragged_paged_attention import make_batch, reference_out

    if shape == "small":
        b = make_batch(3, [1, 1, 1], [300, 70, 1], num_kv_heads=2, group=4, head_dim=128, page_size=16,
                       dtype=jnp.bfloat16, extra_tokens=2)
        args = (b.q, b.kv_pages, b.kv_lens, b.page_indices, b.num_seqs)
        ref = np.asarray(reference_out(b, dict(sm_scale=128 ** -0.5)))
        return args, ref, 3
    sys.path.insert(0, HERE)
    import bench_attention as ba  # issue 3's case as the decode benchmarks build it
    t, qkv, pages, (kv_lens, table, num_seqs, _) = ba.decode_kernel_inputs(8, 2048, 16, 512)
    q = qkv[:, :, :ba.NUM_Q_HEADS // ba.NUM_KV_HEADS].reshape(t, ba.NUM_Q_HEADS, ba.HEAD_DIM)
    from jaxengine.pallas_kernels.ragged_paged_attention import reference
    cu = jnp.minimum(jnp.arange(table.shape[0] + 1, dtype=jnp.int32), num_seqs[0])
    ref = np.asarray(reference.ragged_paged_attention(q, pages, kv_lens, table, cu, num_seqs,
                                                      sm_scale=128 ** -0.5).astype(jnp.float32))
    return (q, pages, kv_lens, table, num_seqs), ref, 8


def run_one(shape: str, merge: str, levels: list[str], interpret: bool = False) -> None:
    """In the subprocess: each level of one (shape, merge), step by step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxengine.pallas_kernels.ragged_paged_attention import gpu_decode_mgpu as mgpu

    args, ref, n = _case(shape)
    q, pages = args[0], args[1]
    cfg = mgpu.default_config(q.shape[0], pages.shape[2] // 2, q.shape[1], q.shape[2], pages.shape[1],
                              args[3].shape[1], "cluster" if merge == "one" else merge)
    if merge == "one":
        cfg["num_splits"] = 1
    elif shape == "small":
        cfg["num_splits"] = 2
    kw = dict(sm_scale=128 ** -0.5, interpret=interpret, merge="combine" if merge == "one" else merge, **cfg)
    _say(shape, merge, "config", json.dumps(cfg))
    for level in levels:
        probe, vreg = int(level[0]), level.endswith("r")
        f = jax.jit(lambda *a, probe=probe, vreg=vreg: mgpu._attend(*a, probe=probe, v_via_registers=vreg, **kw))
        t0 = time.perf_counter()
        _say(shape, merge, level, "lower")
        lowered = f.lower(*args)
        _say(shape, merge, level, "lowered", f"{time.perf_counter() - t0:.1f}")
        t0 = time.perf_counter()
        _say(shape, merge, level, "compile")
        compiled = lowered.compile()
        _say(shape, merge, level, "compiled", f"{time.perf_counter() - t0:.1f}")
        t0 = time.perf_counter()
        _say(shape, merge, level, "run")
        out = jax.block_until_ready(compiled(*args))
        _say(shape, merge, level, "ran", f"{time.perf_counter() - t0:.2f}")
        if merge == "combine" and cfg["num_splits"] > 1:
            out = mgpu._combine(*out, group=q.shape[1] // (pages.shape[2] // 2), dtype=q.dtype, interpret=interpret)
        if probe == 3:
            o = np.asarray(out.astype(jnp.float32))
            err = float(np.linalg.norm(o[:n] - ref[:n]) / np.linalg.norm(ref[:n]))
            pad_zero = bool(np.all(o[n:] == 0))
            t0 = time.perf_counter()
            for _ in range(1 if interpret else 20):
                out = compiled(*args)
            jax.block_until_ready(out)
            us = (time.perf_counter() - t0) / (1 if interpret else 20) * 1e6
            _say(shape, merge, level, "checked", f"{err:.2e}", "pad_zero" if pad_zero else "PAD_NOT_ZERO",
                 f"{us:.1f}us_host")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=3, metavar=("SHAPE", "MERGE", "LEVELS"), help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds for one subprocess (all its levels)")
    ap.add_argument("--out", default="mgpu_decode_probe.json")
    ap.add_argument("--dump", help="directory for each subprocess's output (the one-split case's with PTX / SASS)")
    ap.add_argument("--merges", default=",".join(MERGES))
    ap.add_argument("--shapes", default="small,b8")
    ap.add_argument("--interpret", action="store_true", help="Mosaic GPU's interpreter (a CPU check of this script)")
    a = ap.parse_args()
    if a.one:
        shape, merge, levels = a.one
        run_one(shape, merge, levels.split(","), a.interpret)
        return

    results, ok = [], True
    shapes = a.shapes.split(",")
    plan = [("small", m, "0,1,2,3r,3") for m in a.merges.split(",") if "small" in shapes]
    plan += [("b8", m, "3r,3") for m in a.merges.split(",") if m != "one" and "b8" in shapes]
    for shape, merge, levels in plan:
        env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", PYTHONUNBUFFERED="1")
        if a.dump and shape == "small" and merge == "one":
            env.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_SASS="1")
        t0 = time.perf_counter()
        cmd = [sys.executable, os.path.abspath(__file__), "--one", shape, merge, levels]
        cmd += ["--interpret"] if a.interpret else []
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
            out, status = p.stdout + p.stderr, ("exit 0" if p.returncode == 0 else f"exit {p.returncode}")
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            out += (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            status = f"TIMEOUT after {a.timeout:.0f} s"
        if a.dump:
            os.makedirs(a.dump, exist_ok=True)
            with open(os.path.join(a.dump, f"{shape}_{merge}.log"), "w") as f:
                f.write(out)
        steps = [line.split(None, 1)[1] for line in out.splitlines() if line.startswith("STEP ")]
        ptxas = [line for line in out.splitlines() if "ptxas" in line.lower()][-4:]
        def good(level):
            return any(s.startswith(f"{shape} {merge} {level} checked") and s.split()[4] != "nan"
                       and float(s.split()[4]) < 2e-2 and "pad_zero" in s for s in steps)
        passed, passed_vreg = good("3"), good("3r")
        ok &= passed
        last = steps[-1] if steps else "(nothing printed)"
        results.append(dict(shape=shape, merge=merge, levels=levels, status=status, passed=passed,
                            passed_v_via_registers=passed_vreg,
                            seconds=round(time.perf_counter() - t0, 1), steps=steps, ptxas=ptxas,
                            tail=out.splitlines()[-15:] if not passed else []))
        verdict = "PASS" if passed else ("FAIL (3r PASS: v_via_registers works)" if passed_vreg else "FAIL")
        print(f"| {shape} | {merge} | {status} | {verdict} | last: {last} |", flush=True)
        for s in steps:
            print("   ", s, flush=True)
        for line in ptxas:
            print("    ptxas:", line.strip()[:160], flush=True)
        if not passed:
            for line in out.splitlines()[-15:]:
                print("    >", line[:200], flush=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    print("ALL PASSED" if ok else "SOME FAILED", flush=True)


if __name__ == "__main__":
    main()
