"""Benchmark the fused decode matmuls against XLA on the local accelerator; prints a table, writes JSON.

    python scripts/bench_matmul.py --out bench_matmul.json [--models llama-8b,llama-1b]
        [--rows 1,8,16,32,64] [--sweep] [--plain]

For each model shape and row count (the token bucket of a decode step) and each of a layer's four
matmul groups (q/k/v with the input RMSNorm; gate/up with the post-attention RMSNorm and SwiGLU;
o_proj + residual; down_proj + residual), it times XLA (the unfused jnp ops the model runs
otherwise, fused by XLA as it sees fit) and the Pallas kernel (default config; with --sweep, a grid
of block sizes / warps / stages, best reported).  A call cycles through enough distinct weight
copies (>= 512 MiB) that nothing is served from L2, as in a real model, repeated in one jit until
>= 6 GiB have moved (see `timed`).  "bytes" = the weights plus
x, residual and output, once; the fraction is against the copy bandwidth measured in the same run
(bench_latency.measure_ceilings: best of XLA's and torch's copy).

--plain times the engine's four decode GEMMs as plain x @ w.T (q/k/v and gate/up as one weight
each, the fused layout) with XLA against the Mosaic GPU kernel of pallas_kernels/decode_matmul
(TMA + wgmma), --sweep its tile_k / splits / stages.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jaxengine.pallas_kernels.fused_matmul import gpu, reference

# hidden, intermediate, q width (heads x head_dim), kv width
MODELS = {
    "llama-8b": dict(h=4096, f=14336, q=4096, kv=1024),
    "llama-1b": dict(h=2048, f=8192, q=2048, kv=512),
    "tiny": dict(h=64, f=128, q=64, kv=32),  # tests (CPU, interpret mode)
}
DTYPE = jnp.bfloat16
EPS = 1e-5
MIN_BYTES = 512 << 20  # distinct weight copies of at least this many bytes, so L2 never holds them


def ops_for(shape):
    """name -> (weight shapes, K, kind)."""
    h, f, q, kv = shape["h"], shape["f"], shape["q"], shape["kv"]
    return {
        "qkv+norm": ([(q, h), (kv, h), (kv, h)], h, "norm_linear"),
        "gate_up+norm+silu": ([(f, h), (f, h)], h, "gate_up"),
        "o+residual": ([(h, q)], q, "residual"),
        "down+residual": ([(h, f)], f, "residual"),
    }


def plain_ops_for(shape):
    """--plain: the engine's four decode GEMMs as it runs them (fused layout), x @ w.T alone."""
    h, f, q, kv = shape["h"], shape["f"], shape["q"], shape["kv"]
    return {"qkv": ([(q + 2 * kv, h)], h, "plain"), "gate_up": ([(2 * f, h)], h, "plain"),
            "o": ([(h, q)], q, "plain"), "down": ([(h, f)], f, "plain")}


def make_call(kind, impl, cfg=None):
    cfg = cfg or {}
    if kind == "plain":
        if impl == "xla":
            return lambda x, g, ws, r: jnp.einsum("mk,nk->mn", x, ws[0])
        from jaxengine.pallas_kernels.decode_matmul import gpu as mgpu
        return lambda x, g, ws, r: mgpu.decode_matmul(x, ws[0], **cfg)
    if kind == "norm_linear":
        if impl == "xla":
            return lambda x, g, ws, r: reference.norm_linear(x, g, EPS, ws)
        return lambda x, g, ws, r: gpu.norm_linear(x, g, EPS, ws, **cfg)
    if kind == "gate_up":
        if impl == "xla":
            return lambda x, g, ws, r: reference.norm_gate_up(x, g, EPS, *ws)
        return lambda x, g, ws, r: gpu.norm_gate_up(x, g, EPS, *ws, **cfg)
    if impl == "xla":
        return lambda x, g, ws, r: reference.linear_residual(x, ws[0], r)
    return lambda x, g, ws, r: gpu.linear_residual(x, ws[0], r, **cfg)


def _loop(call, copies, min_bytes, bytes_per_call):
    """(jitted loop, calls per loop): the calls cycle over the distinct weight copies, repeated
    inside one jit until >= min_bytes move."""
    reps = max(1, -(-min_bytes // (bytes_per_call * len(copies))))

    def loop(x, g, copies, r):
        outs = []
        for rep in range(reps):
            # x of each repetition depends on the last one's output: XLA may not merge the calls
            # that share a weight into one GEMM (its dot merger does that to independent dots,
            # which a first version of this script timed at "376% of the copy bandwidth")
            dep = jax.tree.leaves(outs[-1])[0][0, 0] if outs else jnp.zeros((), x.dtype)
            xr = x + (dep * 0).astype(x.dtype)
            outs.append([call(xr, g, ws, r) for ws in copies])
        return outs
    return jax.jit(loop), reps * len(copies)


def timed(call, x, g, copies, r, repeats=5, min_bytes=6 << 30, bytes_per_call=1):
    """Median seconds per call, host-timed over one jit of many chained calls, so the host's
    dispatch of the jit (hundreds of us with many arguments) is a small part of what is timed;
    each call's dependency ops and the gaps between kernels are in it."""
    loop, calls = _loop(call, copies, min_bytes, bytes_per_call)
    jax.block_until_ready(loop(x, g, copies, r))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(x, g, copies, r))
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def device_kernels(call, x, g, copies, r, min_bytes=1 << 30, bytes_per_call=1):
    """Device kernels of one call, from a jax.profiler trace of the chained loop: [(name, us per
    call)], biggest first, less the dependency kernels (the same loop around the identity)."""
    import tempfile

    from bench_forward import kernel_table

    def table(f):
        loop, calls = _loop(f, copies, min_bytes, bytes_per_call)
        jax.block_until_ready(loop(x, g, copies, r))
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                jax.block_until_ready(loop(x, g, copies, r))
            return {row["kernel"]: row["us_per_step"] for row in kernel_table(d, calls)}

    harness = table(lambda x, g, ws, r: x[:, :ws[0].shape[0]] if x.shape[1] >= ws[0].shape[0]
                    else jnp.pad(x, [(0, 0), (0, ws[0].shape[0] - x.shape[1])]))
    got = table(call)
    rows = [(k, us - harness.get(k, 0.0)) for k, us in got.items()]
    return sorted([row for row in rows if row[1] > 0.05], key=lambda row: -row[1])


def sweep_configs(kind):
    for bn, bk, w, st in itertools.product((16, 32, 64), (256, 512), (4, 8), (3, 4)):
        yield dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st)


def plain_sweep_configs(k, m=64):
    """(tile_k, stages) x splits x warp specialisation, within ~200 KiB of shared memory (a stage
    holds a [64, tile_k] weight tile and an [m padded to 8, tile_k] x tile)."""
    for (tk, st), sp, ws in itertools.product(((128, 4), (128, 8), (256, 4), (256, 6)), (1, 2, 4),
                                              (False, True)):
        if k % (tk * sp) == 0 and st * (64 + -(-m // 8) * 8) * tk * 2 <= 200 << 10:
            yield dict(tile_k=tk, splits=sp, stages=st, warp_specialized=ws)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_matmul.json")
    ap.add_argument("--models", default="llama-8b,llama-1b")
    ap.add_argument("--rows", default="1,8,16,32,64")
    ap.add_argument("--sweep", action="store_true", help="grid of kernel configs (slow)")
    ap.add_argument("--sweep-rows", default="8,64", help="row counts the sweep runs at")
    ap.add_argument("--ops", default=None, help="comma-separated subset of the ops (default: all)")
    ap.add_argument("--min-gib", type=float, default=6.0, help="bytes moved per timed jit call")
    ap.add_argument("--device-time", action="store_true",
                    help="also each call's device kernels (jax.profiler trace, dependency ops "
                         "subtracted): kernel-only time, no launch gaps")
    ap.add_argument("--plain", action="store_true",
                    help="the four plain decode GEMMs: XLA against the Mosaic GPU decode_matmul "
                         "(pallas_kernels/decode_matmul) instead of the fused Triton kernels")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_latency import measure_ceilings

    dev = jax.devices()[0]
    ceil = measure_ceilings()
    hbm = ceil["copy_bytes_per_s"]
    print(f"device: {dev.device_kind}; jax {jax.__version__}; copy bandwidth {hbm / 1e12:.2f} TB/s",
          flush=True)
    print("| model | rows | op | impl | config | time us | TB/s | of copy bw |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows_out = []

    def save():
        with open(args.out, "w") as fh:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, copy_bytes_per_s=hbm,
                           ceilings=ceil, argv=sys.argv, rows=rows_out), fh, indent=1)

    key = jax.random.key(0)
    sweep_rows = {int(v) for v in args.sweep_rows.split(",")}
    for model in args.models.split(","):
        shape = MODELS[model]
        ops = plain_ops_for(shape) if args.plain else ops_for(shape)
        for name, (wshapes, k, kind) in ops.items():
            if args.ops and name not in args.ops.split(","):
                continue
            wbytes = sum(a * b for a, b in wshapes) * 2
            n_copies = max(2, -(-MIN_BYTES // wbytes))
            copies = [[jax.random.normal(jax.random.fold_in(key, 100 * c + i), s, DTYPE) * 0.02
                       for i, s in enumerate(wshapes)] for c in range(n_copies)]
            g = jnp.ones((k,), DTYPE)
            for m in [int(v) for v in args.rows.split(",")]:
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), DTYPE)
                n_out = wshapes[0][0] if kind != "norm_linear" else sum(s[0] for s in wshapes)
                r = jax.random.normal(jax.random.fold_in(key, m + 1), (m, wshapes[0][0]), DTYPE)
                bytes_ = wbytes + 2 * m * (k + n_out + (n_out if kind == "residual" else 0))
                kernel = "mgpu" if kind == "plain" else "pallas"
                variants = [("xla", None), (kernel, None)]
                if args.sweep and m in sweep_rows:
                    configs = plain_sweep_configs(k, m) if kind == "plain" else sweep_configs(kind)
                    variants += [(kernel, c) for c in configs]
                want = None
                best = None
                for impl, cfg in variants:
                    row = dict(model=model, rows=m, op=name, impl=impl, bytes=bytes_,
                               config=cfg or _default_config(impl, kind, m, wshapes, k),
                               default=cfg is None)
                    try:
                        call = make_call(kind, impl, cfg)
                        out = jax.jit(call)(x, g, copies[0], r)
                        if want is None:
                            want = out
                        else:
                            a = np.asarray(jax.tree.leaves(out)[0], np.float32)
                            b = np.asarray(jax.tree.leaves(want)[0], np.float32)
                            row["rel_err"] = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
                        t = timed(call, x, g, copies, r, bytes_per_call=bytes_, min_bytes=int(args.min_gib * 2**30))
                        row.update(time_us=t * 1e6, bytes_per_s=bytes_ / t, hbm_frac=bytes_ / t / hbm)
                        if args.device_time:
                            kernels = device_kernels(call, x, g, copies, r, bytes_per_call=bytes_)
                            dev_us = sum(us for _, us in kernels)
                            if dev_us > 0:  # no device kernels in a CPU trace
                                row.update(device_us=dev_us, device_frac=bytes_ / (dev_us * 1e-6) / hbm,
                                           kernels=[(k[:60], round(us, 2)) for k, us in kernels[:4]])
                    except Exception as e:  # one failing config must not end the run
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        if cfg is None:
                            traceback.print_exc(limit=2)
                    rows_out.append(row)
                    _print(row)
                    if cfg is not None and "error" not in row and (best is None or row["time_us"] < best["time_us"]):
                        best = row
                if best is not None:
                    best = dict(best, impl=f"{kernel}-best")
                    rows_out.append(best)
                    _print(best)
                save()
            del copies
    save()


def _default_config(impl, kind, m, wshapes, k):
    if impl == "pallas":
        return gpu.default_config(m, [s[0] for s in wshapes], k, gate_up=kind == "gate_up")
    if impl == "mgpu":
        from jaxengine.pallas_kernels.decode_matmul import gpu as mgpu
        return mgpu.default_config(m, wshapes[0][0], k)
    return None


def _print(r):
    if "error" in r:
        print(f"| {r['model']} | {r['rows']} | {r['op']} | {r['impl']} | {r['config']} | ERROR "
              f"{r['error'][:100]} |", flush=True)
        return
    cfg = "-" if not r["config"] else ",".join(f"{k[6:] if k.startswith('block_') else k[4:] if k.startswith('num_') else k}"
                                               f"={v}" for k, v in r["config"].items())
    dev = ""
    if "device_us" in r:
        dev = (f" device {r['device_us']:.1f} us ({r['device_frac'] * 100:.0f}%): "
               + ", ".join(f"{k} {us}" for k, us in r["kernels"]) + " |")
    print(f"| {r['model']} | {r['rows']} | {r['op']} | {r['impl']} | {cfg} | {r['time_us']:.1f} | "
          f"{r['bytes_per_s'] / 1e12:.2f} | {r['hbm_frac'] * 100:.0f}% |{dev}", flush=True)


if __name__ == "__main__":
    main()
