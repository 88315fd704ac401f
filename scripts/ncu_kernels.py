"""Run one attention kernel case a few times, for Nsight Compute (`ncu`) to profile.

    ncu --clock-control none --set full -k regex:decode_attention --launch-skip 2 --launch-count 1 \\
        python3 scripts/ncu_kernels.py --case decode-b8-ctx2048

Cases (Llama-3-8B attention: 32 q heads, 8 kv heads, head_dim 128, bf16), as bench_attention.py
builds them:
  decode-bB-ctxC   the engine's decode kernel (gpu_decode: rope + KV write + attention, fused q/k/v),
                   page 16, an 8k-token page table (`--decode-kernel-sweep`'s setting)
  ragged-bB-ctxC   the ragged kernel on a decode-only step (page 32)
  prefill-N        the ragged kernel on one N-token causal prefill chunk (page 32)
`--splits`, `--block-k`, `--stages`, `--warps` override the decode kernel's tile; `--prefill-kernel mgpu`
runs a prefill case's long launch on the Mosaic GPU kernel (ncu -k regex:prefill_attention_mgpu).  Without ncu the
script prints the kernel's wall time per call (host-timed, a sanity check only).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import HEAD_DIM, NUM_KV_HEADS, SM_SCALE, decode_kernel_inputs, make_step  # noqa: E402


def decode_case(batch, ctx, overrides):
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu_decode

    ps, width = 16, 512
    t, qkv, pages, rest = decode_kernel_inputs(batch, ctx, ps, width)
    f = jax.jit(lambda qkv, pages, *rest: gpu_decode.decode_attention(
        qkv, None, None, pages, *rest, sm_scale=SM_SCALE, **overrides), donate_argnums=(1,))
    state = {"pages": pages}

    def call():
        out, state["pages"] = f(qkv, state["pages"], *rest)
        return out
    cfg = gpu_decode.default_config(t, NUM_KV_HEADS, HEAD_DIM, ps, width)
    cfg.update(overrides)
    return call, cfg, batch * (ctx + 1) * 2 * NUM_KV_HEADS * HEAD_DIM * 2


def ragged_case(q_lens, ctx_lens, overrides):
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu

    args, bytes_, _ = make_step(q_lens, ctx_lens, 32)
    f = jax.jit(lambda *a: gpu.ragged_paged_attention(*a, sm_scale=SM_SCALE, **overrides))
    return (lambda: f(*args)), dict(overrides), bytes_


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", required=True)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--splits", type=int)
    ap.add_argument("--block-k", type=int)
    ap.add_argument("--stages", type=int)
    ap.add_argument("--warps", type=int)
    ap.add_argument("--prefill-kernel", choices=("triton", "mgpu"))
    args = ap.parse_args()
    overrides = {k: v for k, v in (("num_splits", args.splits), ("block_k", args.block_k),
                                   ("num_stages", args.stages), ("num_warps", args.warps),
                                   ("prefill_kernel", args.prefill_kernel)) if v is not None}
    m = re.fullmatch(r"(decode|ragged)-b(\d+)-ctx(\d+)|prefill-(\d+)", args.case)
    if not m:
        raise SystemExit(f"--case: unknown case {args.case!r}")
    if m.group(1) == "decode":
        call, cfg, bytes_ = decode_case(int(m.group(2)), int(m.group(3)), overrides)
    elif m.group(1) == "ragged":
        b, c = int(m.group(2)), int(m.group(3))
        call, cfg, bytes_ = ragged_case([1] * b, [c] * b, overrides)
    else:
        n = int(m.group(4))
        call, cfg, bytes_ = ragged_case([n], [n], overrides)
    jax.block_until_ready(call())
    times = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    print(f"case {args.case} config {cfg} K/V+q bytes {bytes_ / 1e6:.1f} MB; host-timed call "
          f"{min(times) * 1e6:.1f} us (min of {args.calls})", flush=True)


if __name__ == "__main__":
    main()
