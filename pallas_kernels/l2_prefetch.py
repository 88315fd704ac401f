"""L2 prefetch of a decode layer's next weights during the kernels that leave HBM idle: the plan.

At batch 1 a layer's decode attention (~8 us of latency on ~0.5 MB of K/V) and, at 1B, its small
q/k/v and o GEMMs (51-60% of the copy rate: launch, ramp and epilogue, not bytes) run while HBM has
bandwidth to spare (eighteenth session's profile).  Kernels that run then can read the weights
of the GEMMs after them into L2: the decode attention through extra programs
(ragged_paged_attention/gpu_decode), the Mosaic GPU q/k/v and o matmuls through TMA L2 prefetches
of their CTAs (decode_matmul/gpu).  `plan` says what each of those windows reads: the layer's
weights in the order their GEMMs run (o, gate/up, down), each as `parts` K ranges (the ranges its
kernel's CTAs walk: decode_matmul.mgpu_k_parts), a window taking whole weights, then the same
leading columns of every part of the next one, continuing where the window before stopped, so
every CTA of a later GEMM finds the start of its walk in L2.

$JAXENGINE_L2_PREFETCH turns it on (an experiment switch, off by default until measured on a GPU):
"key=value,..." over
  mb          the attention window's budget, MiB a launch (0: none)
  qkv_mb      the q/k/v GEMM's window (1B-sized GEMMs; 0: none)
  o_mb        the o GEMM's window (it skips the o weight itself; 0: none)
  programs    about how many prefetch programs the attention launch adds (default 256)
  max_tokens  token buckets of at most this many rows only (default 8; at batch 64 the attention
              streams its own K/V and the GEMMs their weights)
  evict       "normal" or "last" (the attention programs' loads' L2 eviction priority)
  tile_rows   the attention programs' tile rows (4, 8 or 16, x 512 columns; default 16: 65 registers,
              as 8; 32 would take 125 and cost the attention programs occupancy, offline sm_90a compile)
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os

import jax.numpy as jnp
from jax import lax

# (rows, parts, c0, c1, part_stride): columns [p * part_stride + c0, p * part_stride + c1) of rows
# [0, rows) for each part p < parts
Region = tuple[int, int, int, int, int]

ALIGN = 64  # columns: a TMA box / Triton tile edge


@dataclasses.dataclass(frozen=True)
class L2Prefetch:
    mb: float = 0.0
    qkv_mb: float = 0.0
    o_mb: float = 0.0
    programs: int = 256
    max_tokens: int = 8
    evict: str = "normal"
    tile_rows: int = 16  # the attention-side programs' tile: [tile_rows, 512] (16 KB bf16 in flight)

    def active(self, rows: int) -> bool:
        """Whether a token bucket of `rows` rows prefetches at all."""
        return rows <= self.max_tokens and (self.mb > 0 or self.qkv_mb > 0 or self.o_mb > 0)


_FLOATS, _INTS = ("mb", "qkv_mb", "o_mb"), ("programs", "max_tokens", "tile_rows")


def setting() -> L2Prefetch:
    """$JAXENGINE_L2_PREFETCH parsed; a key or value it does not know is a ValueError naming the
    variable."""
    text = os.environ.get("JAXENGINE_L2_PREFETCH", "").strip()
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = (x.strip() for x in item.partition("="))
        try:
            if key in _FLOATS:
                values[key] = float(value)
                ok = values[key] >= 0
            elif key in _INTS:
                values[key] = int(value)
                ok = values[key] >= 1 and (key != "tile_rows" or values[key] in (4, 8, 16))
            else:
                values[key] = value
                ok = key == "evict" and value in ("normal", "last")
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"JAXENGINE_L2_PREFETCH: {item!r} is not one of mb=, qkv_mb=, o_mb= (MiB >= 0), "
                             "programs=, max_tokens= (n >= 1), tile_rows=4|8|16, evict=normal|last "
                             "(e.g. 'mb=16,o_mb=8')")
    return L2Prefetch(**values)


def plan(weights, windows) -> list[tuple]:
    """What each window reads.  weights: ((rows, K), parts, itemsize) each, in the order their GEMMs
    run; windows: (budget bytes, first weight index it may read) each, in the order they run.
    Returns, per window, ((weight index, Region), ...).  A window starts where the previous one
    stopped (or at its first weight), takes the rest of that weight's columns, whole weights after
    it, then the leading columns (a multiple of ALIGN) of every part of the next one, within its
    budget."""
    for (rows, k), parts, _ in weights:
        if k % parts or (k // parts) % ALIGN:
            raise ValueError(f"l2 prefetch: a weight of {k} columns in {parts} parts of a multiple of {ALIGN}")
    done = [0] * len(weights)  # leading columns a part already planned, per weight
    out = []
    for budget, first in windows:
        regions = []
        for i in range(first, len(weights)):
            (rows, k), parts, itemsize = weights[i]
            stride = k // parts
            if done[i] >= stride:
                continue
            take = min(stride - done[i], budget // (rows * parts * itemsize) // ALIGN * ALIGN)
            if take <= 0:
                break
            regions.append((i, (rows, parts, done[i], done[i] + take, stride)))
            done[i] += take
            budget -= rows * parts * take * itemsize
            if done[i] < stride:  # the budget ends inside this weight
                break
        out.append(tuple(regions))
    return out


WINDOWS = ("qkv", "attention", "o")  # the kernels that read ahead, in the order they run


def windows(stream, rows: int, gemm: bool = True) -> dict[str, tuple]:
    """A layer's plan: stream = ((weight [..., K], parts), ...) the layer's o, gate/up and down
    weights in the order they run (models.llama.l2_prefetch_list); rows: the token bucket; gemm:
    whether the q/k/v and o GEMMs can prefetch (the Mosaic decode matmuls).  Returns {window:
    ((weight, Region), ...)} for the windows with something to read under $JAXENGINE_L2_PREFETCH:
    "qkv" (during the q/k/v GEMM), "attention", "o" (during the o GEMM, past the o weight)."""
    cfg = setting()
    if not stream or not cfg.active(rows):
        return {}
    shapes = []
    for w, parts in stream:  # a weight whose K ranges are not whole 64-column boxes ends the stream
        if w.shape[-1] % parts or (w.shape[-1] // parts) % ALIGN:
            break
        shapes.append(((math.prod(w.shape[:-1]), w.shape[-1]), parts, w.dtype.itemsize))
    mib = 1 << 20
    budgets = [(int(cfg.qkv_mb * mib) if gemm else 0, 0), (int(cfg.mb * mib), 0),
               (int(cfg.o_mb * mib) if gemm else 0, 1)]
    return {name: tuple((stream[i][0], region) for i, region in regions)
            for name, regions in zip(WINDOWS, plan(shapes, budgets)) if regions}


def deal(pid, num_programs: int, offset: int, tiles: int):
    """(first, count): program pid's tiles of a region, dealt round robin over num_programs programs
    where the regions before it had `offset` tiles (the deal runs on across regions): tiles first,
    first + num_programs, ... below `tiles`.  pid an int or a traced scalar."""
    if isinstance(pid, int):
        first = (pid - offset) % num_programs
        return first, max(tiles - first + num_programs - 1, 0) // num_programs
    first = lax.rem(pid - offset % num_programs + num_programs, num_programs)
    return first, lax.div(jnp.maximum(tiles - first + num_programs - 1, 0), num_programs)


def tile_origin(t, region: Region, tile: tuple[int, int]):
    """(row, column, column within the part's range) of tile t of a region cut in `tile` [rows,
    columns] tiles (column tiles fastest, then parts, then row tiles); ints or traced scalars."""
    rows, parts, c0, c1, stride = region
    col_tiles = -(-(c1 - c0) // tile[1])
    if isinstance(t, int):
        div, rem = operator.floordiv, operator.mod
    else:  # non-negative: truncating division, one op in a kernel (floor division is several)
        div, rem = lax.div, lax.rem
    rest = div(t, col_tiles)
    local = rem(t, col_tiles) * tile[1]
    return div(rest, parts) * tile[0], rem(rest, parts) * stride + c0 + local, local


def num_tiles(region: Region, tile: tuple[int, int]) -> int:
    rows, parts, c0, c1, _ = region
    return -(-rows // tile[0]) * parts * -(-(c1 - c0) // tile[1])
