#!/usr/bin/env bash
# The GPU measurements of issues 3 and 6, in parts that each fit one 10-minute device call.
#
#   bash scripts/gpu_suite.sh PART [PART ...]      (on the GPU machine, from the repository root)
#
# Installs this checkout into /tmp/site once (no dependencies: the machine has jax, torch and
# transformers), writes JSON and logs under $OUT (default ./gpu_out) and prints a summary per part.
# Parts, with their rough wall time on an H100:
#   check       compiled kernel and engine tests (attention, decode kernel, fused matmul, multi-step, parity) >5 min
#   forward     decode forward program alone, 8B and 1B at batch 1 and 64, with kernel tables + HLO ~3 min
#   decode      bench_forward, 8B and 1B at batch 1 and 64, decode attention general vs fused (profiled) ~4 min
#   layout      bench_forward, 8B and 1B at batch 1 and 64, params layout hf vs fused (profiled)  ~4 min
#   tiling      bench_forward, 8B fused, with --xla_gpu_exhaustive_tiling_search=true            ~3 min
#   multistep   1B and 8B, batch 1 and 64, num_scheduler_steps 1 vs 8 (4 engine starts)         ~6 min
#   decodeprog  1B and 8B, batch 1 and 64, K = 1: two programs a decode step vs the decode program (A/B)  ~5 min
#   profile     K = 8 engine runs under jax.profiler: kernels per output token, device busy vs span  ~5 min
#   hostpath    1B K = 1 at batch 1 and 64: two programs, device_put inputs, decode program (profiled);
#               then host_overhead.py on this machine                                             ~5 min
#   norm        bench_forward 8B and 1B, b1 and b64, fused decode attention, residual norm off vs the
#               Pallas kernel (profiled, HLO), then the engine at K = 8 with the kernel (default)  ~7 min
#   splits      bench_attention --decode-kernel-sweep (decode kernel: batch x context x kv splits), then
#               bench_forward 1B residual norm off vs kernel                                      ~5 min
#   engine      the engine at K = 8 (the defaults), 8B and 1B, 128/128 at batch 1 and 64        ~4 min
#   failing     the compiled decode_matmul tests that failed in the twelfth session (-k normed/lowers)  ~2 min
#   abunroll    the engine at K = 8, 1B and 8B b1/b64, multi-step programs unrolled ($JAXENGINE_MULTI_STEP_UNROLL
#               in $UNROLLS, default "0 1": unrolled, then the loop)                              ~9 min
#   chaintests  compiled test_decode_attention merged/chain cases and the multi-step engine tests  ~2 min
#   cbflags     bench_step (k = 1 and K = 8 programs, batch 1, 1B and 8B) under XLA command-buffer flags:
#               default, update mode SKIP_TEMP, +WHILE (device-side loop), both, +WHILE with unrolled loops  ~8 min
#   absampler   bench_step 1B b1/b64 (sampler PLAIN/FULL ms) with $JAXENGINE_SAMPLER_FILTER sort / search / sort  ~4 min
#   abdispatch  the engine at K = 8, 1B and 8B b1/b64, device calls on the calling thread, then on one
#               dispatching thread ($JAXENGINE_DISPATCH_THREAD=1)                                  ~8 min
#   kernelsweep bench_attention --decode-kernel-sweep alone (the first half of splits)              ~3 min
#   batches     8B 128/128 at batch 8, 32, 128, 256                                               ~3 min
#   long        8B 1024/128 at 64 and 4096/256 at 8                                              ~4 min
#   qwen3       Qwen3-8B shape, batch 1 and 64                                                    ~3 min
#   throughput  bench_throughput, 8B, ShareGPT-like mix of 256 prompts, default and finer buckets  ~8 min
#   samplerprof bench_step 1B b1/b64 profiled (the K = 8 program and the FULL sampler's kernels), max_logprobs
#               20, 16 (XLA:GPU's TopK kernel stops at k = 16), then 20 with $JAXENGINE_SAMPLER_TOPN=chunks  ~6 min
#   topp        the engine at K = 8 sampling with temperature 0.7, top_p 0.9 (the FILTER sampler), 1B and 8B,
#               b1/b64, then bench_step 1B b1/b64 (sampler PLAIN / FILTER / FULL ms)               ~6 min
#   unrollskip  the unrolled K = 8 program under --xla_gpu_command_buffer_update_mode=SKIP_TEMP: bench_step
#               1B/8B b1, then the engine 1B/8B b1/b64 (against `engine`/`abdispatch` figures)  ~7 min
#               (fourteenth session: worse than the loop at 3 of 4 points, dropped)
#   longbudget  8B 1024/128 at 64, K = 8, max_num_batched_tokens 2048 / 4096 / 8192 ($BUDGETS), with the
#               roofline split by phase (prefill until the last first token, then decode)          ~6 min
#               (fourteenth session: 75.5% / 79.0% at 2048 / 8192)
#   abprefill   8B 1024/128 at 64, K = 8, budget 8192, prefill attention Triton then Mosaic GPU ($PREFILL_KERNELS)  ~5 min
#   throughput8 bench_throughput at K = 8 (multi-step), 8B then 1B, ShareGPT-like mix               ~5 min
#   startup     8B cold and warm compilation cache, then warm with the serial warm-up (JAXENGINE_COMPILE_THREADS=1);
#               then cold and warm with the engine's default KV cache size (--kv-cache-gib 0)      ~5 min
#   table       bench_attention --table --device-time: issue 3's table (decode b1-256 x ctx 512-32k, prefill
#               512-8192, mixed) with jax's paged_attention, cuDNN and the jnp reference, no sweeps  ~2.5 min (H100)
#   attention   bench_attention --quick                                                           ~4 min
#   kernels     compiled attention, decode-attention, decode-matmul and residual-norm kernel tests  ~6 min
#   tiles       bench_attention --prefill-tiles (two-launch default vs one launch, 128 and 256 rows)  ~3 min
#   longtiles   bench_attention --long-tile-sweep (the two-launch default's long tile: stages, block_k, 128 rows)  ~2 min
#   decodeonly  bench_attention --quick --decode-only --device-time (ragged kernel decode, batch 8/64 x context 2k/8k, peers)  ~1 min
#   prefill     bench_attention --prefill-sweep (prefill chunks 512-8192, tile/stage sweep at 4k and 8k)  ~5 min
#   decodesweep bench_attention --decode-sweep --device-time (ragged kernel decode tiles at b8 ctx 2k/8k, b64 2k)  ~2 min
#   abdecode    decode kernel (device-timed, --decode-kernel-sweep --quick), ragged kernel decode steps
#               (--quick --decode-only --device-time) and bench_forward 1B/8B b1/b64, with this checkout,
#               then with the install at $OLD_SITE (an A/B of two commits)                        ~7 min
#   xlaflags    bench_forward 1B/8B b1/b64 under XLA_FLAGS: default, PDL on, PDL off (on one machine)  ~1 min
#   mgpumm      compiled decode_matmul tests, then bench_matmul --plain --device-time: the four 8B
#               decode GEMMs, XLA against the Mosaic GPU decode_matmul and a config sweep       ~9 min
#   abmatmul    bench_forward 8B and 1B, b1 and b64, the engine's decode program (fused decode attention,
#               residual-norm kernel), matmuls XLA / Mosaic GPU decode_matmul / XLA (A/B/A), profiled  ~7 min
#   abmmengine  the engine, K = 8, 8B and 1B at batch 1 and 64, decode matmuls XLA then the Mosaic GPU
#               kernels (--decode-matmul mgpu), 4 engine starts                                  ~7 min
#   abnorm      compiled tests of the norm-epilogue kernels (chunked sum of squares included), then
#               bench_forward 8B/1B b1/b16/b64 decode matmuls mgpu_plain / mgpu_norm / mgpu_plain (A/B/A,
#               profiled), mgpu_norm with $JAXENGINE_MGPU_SS_SUM=chunks, the 8B engine at K = 8 (default)  ~8 min
#   abpdl       compiled decode_matmul tests under JAXENGINE_MGPU_PDL=1, bench_forward 8B/1B b1/b64 with
#               the Mosaic GPU kernels, programmatic dependent launch off / on / on + L2 weight prefetch /
#               off, then the engine at K = 8 with PDL mode $PDL_ENGINE (default 2)  ~7 min (eleventh session: no gain)
#   abcombine   the kv-split merge inside the attention kernels ($JAXENGINE_DECODE_COMBINE=separate|kernel):
#               compiled merged-case tests, bench_forward 8B/1B b1/b64 separate / kernel / separate, the
#               decode kernel sweep and the ragged kernel's decode steps (device time) both ways  ~5 min
#   abcluster   1B's split-K GEMMs as clusters of two CTAs ($JAXENGINE_MGPU_CLUSTER_SPLIT, the default since
#               the eleventh session): compiled tests, bench_forward 1B b1/b64, plain kernels and norm
#               epilogues, on / off / on (profiled)                                              ~2 min
#   steptime    the engine's step outside the forward, 1B and 8B at batch 1 and 64: bench_forward (the
#               decode forward alone, profiled), bench_step (the sampler alone, the decode program k = 1
#               and the K = 8 program, device-timed; the K = 8 program's kernels per token), then the
#               engine at K = 8, batch 1, profiled: forward -> programs -> TPOT splits the gap  ~6 min
# PACK=1 packs everything under $OUT into $OUT/all.tgz at the end (the device tool returns 8 files a call).
#   fastmath    compiled ragged-kernel tests, then bench_attention --fast-math-ab --device-time (softmax exponent as PTX)  ~7 min
#   absplit     decode kernel kv splits as contiguous ranges vs round robin: compiled tests, decode kernel sweep each way  ~5 min
#   absearch    bench_step 1B b1/b64, the FILTER sampler's search by ways x reduction ($SEARCHES)      ~5 min
#   abshort     the decode kernel at batch 1 and 8, contexts 128-2k, by tile (bench_attention --decode-short-sweep
#               --device-time), then bench_step 1B and 8B b1 under $JAXENGINE_DECODE_TILE in $TILES   ~6 min
#   prefill128  bench_forward --prefill 128 (the engine's prefill step of a 128-token prompt), 8B and 1B, XLA then
#               Mosaic decode matmuls, profiled: where 8B b1's 7.2-7.8 ms first step goes against its 3.6 ms  ~3 min
#   abl2        compiled L2-prefetch tests, then bench_step --only-k 1B and 8B b1 with $JAXENGINE_L2_PREFETCH in
#               $L2S_1B / $L2S_8B (attention window sizes; 1B also the q/k/v and o GEMM windows); $MODELS  ~9 min
#   abbucket    bench_step --only-k 1B and 8B b1 with $JAXENGINE_MIN_TOKEN_BUCKET 8 / 1 / 8 (a 1-row bucket: no padding
#               rows), then with $ENGINE set the engine at 1                                       ~5 min
#   bgcompile   the twentieth session's defaults (budget 8192, buckets above 2048 compiled in the background):
#               bench_startup 8B cold/warm (first token, then all buckets ready), then 8B 1024/128 at 64, K = 8,
#               with the default budget and with 2048 ($BG_BUDGETS, default "default 2048")          ~9 min
#   abl2eng     the engine 1B and 8B b1 (128/128, K = 8) with $JAXENGINE_L2_PREFETCH=$L2 (default mb=16), then off  ~5 min
#   abl2prof    bench_step's K = 8 program, 1B and 8B b1, profiled (kernels a token) with $L2 (default mb=16)  ~3 min
#   abshorteng  the engine 1B and 8B b1 (128/128, K = 8) with $JAXENGINE_DECODE_TILE=$TILE (default split_min_blocks=4)  ~3 min
#   ab128       the 128-token bucket's GEMMs, XLA vs the Mosaic decode matmuls: bench_forward 8B at 128 rows, then the
#               engine 8B b1 with $JAXENGINE_FUSED_MATMUL_MAX_TOKENS 64 and 128                    ~5 min
#   abpool      decode kernel sweep (--quick, device-timed) with the case's own pages, then in an 8 GiB pool;
#               then the decode-only table (ragged kernel, jax's peer) in the 8 GiB pool          ~5 min
#   loopcheck   bench_step 1B and 8B b1/b64 --loop-check: the K-step program's known trip counts, call return time  ~4 min
#   mgpuprefill compiled tests of the Mosaic GPU prefill kernel, then --mgpu-sweep (device-timed)      ~9 min
#   mgpuprobe   where the Mosaic GPU decode kernel (gpu_decode_mgpu) stops: scripts/mgpu_decode_probe.py, growing probe
#               levels per merge in subprocesses under timeouts, lowering / compile / run timed apart, PTX and SASS
#               of the one-split case in $OUT/mgpuprobe/ (PACK=1 brings them back); run it first: its first compiled run
#               hung (twentieth session)                                                           ~3-8 min
#   mgpudecode  (after mgpuprobe printed ALL PASSED) compiled tests of the Mosaic GPU decode kernel (the cluster merge's
#               numbers run only here), then bench_attention --decode-mgpu --quick --device-time: b8 ctx 2k (issue 3) /
#               8k, b64 ctx 2k, b1 ctx 2k, the Triton decode kernel, the ragged kernel and the Mosaic kernel with both
#               merges, one process                                                                ~7 min
#   prefillcheck bench_attention --prefill-tiles --device-time with nvidia-smi dmon (clocks, power) and throttle reasons  ~3 min
#   ncu         Nsight Compute details of the decode kernel (b8 / b64 ctx 2k) and the 4k prefill chunk  ~2 min
#   hf-static   Hugging Face static-cache generate(), 8B batch 1 and 64 (long compile)            ~8 min
#   hf-eager    Hugging Face eager generate(), 1B and 8B, batch 1 and 64                          ~2 min
# Everything is also runnable by hand: each part is one or two commands below.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
if [ ! -d /tmp/site/jaxengine ]; then
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . >/dev/null 2>&1 \
    || { echo "install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
S=$(date +%s)
lat() {  # name, then bench_latency args
  local name=$1; shift
  timeout 560 python3 scripts/bench_latency.py "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  grep -E "tok/s|phase|failed|Error" "$OUT/$name.log" | grep -v "it/s" | tail -16
}
fwd() {  # name, an environment assignment, then more bench_forward args: 8B and 1B decode forward, b1 and b64
  local name=$1 assign=$2; shift 2
  env "$assign" timeout 100 python3 scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b --batch 1 64 \
    --decode-attention fused --residual-norm gpu "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "-- $assign"; grep -E "^\||Error" "$OUT/$name.log"
}
for part in "$@"; do
  echo "== $part (t=$(( $(date +%s) - S )) s)"
  case $part in
    check)
      (cd tests && timeout 540 python3 -m pytest -q test_residual_norm.py test_decode_attention.py \
        "test_parity.py::test_residual_norm_kernel_greedy_decode_matches_transformers" \
        "test_parity.py::test_decode_attention_greedy_decode_matches_transformers" test_multi_step.py \
        test_ragged_paged_attention.py test_fused_matmul.py "test_parity.py::test_fused_matmul_greedy_decode_matches_transformers" \
        -rf --tb=short > "$OUT/check.log" 2>&1; grep -E "^E |passed|failed|^FAILED" "$OUT/check.log" | head -30) ;;
    forward)
      timeout 500 python3 scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b --batch 1 64 \
        --profile-dir /tmp/prof --hlo-dir "$OUT/hlo" --json "$OUT/forward.json" > "$OUT/forward.log" 2>&1
      grep -v "it/s" "$OUT/forward.log" | tail -130 ;;
    decode)
      timeout 500 python3 scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b --batch 1 64 \
        --decode-attention general fused --profile-dir /tmp/prof --json "$OUT/forward_decode.json" \
        > "$OUT/forward_decode.log" 2>&1
      grep -v "it/s" "$OUT/forward_decode.log" | tail -150 ;;
    layout)
      timeout 250 python3 scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b --batch 1 64 --layout hf \
        --json "$OUT/forward_hf.json" > "$OUT/forward_hf.log" 2>&1; grep "^|" "$OUT/forward_hf.log"
      timeout 300 python3 scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b --batch 1 64 --layout fused \
        --profile-dir /tmp/prof --hlo-dir "$OUT/hlo" --json "$OUT/forward_fused.json" > "$OUT/forward_fused.log" 2>&1
      grep -v "it/s" "$OUT/forward_fused.log" | tail -120 ;;
    tiling)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_exhaustive_tiling_search=true" timeout 400 python3 scripts/bench_forward.py \
        --model llama-3.1-8b --batch 1 64 --layout fused --json "$OUT/forward_tiling.json" \
        > "$OUT/forward_tiling.log" 2>&1; grep -E "^\||device" "$OUT/forward_tiling.log" ;;
    multistep)
      for k in 1 8; do
        lat "latency_k$k" --model llama-3.2-1b llama-3.1-8b --batch 1 64 --num-scheduler-steps $k
      done ;;
    decodeprog)
      lat k1_two_programs --model llama-3.2-1b llama-3.1-8b --batch 1 64
      lat k1_decode_program --model llama-3.2-1b llama-3.1-8b --batch 1 64 --decode-program ;;
    profile)
      lat profile_k8_1b --model llama-3.2-1b --batch 1 64 --num-scheduler-steps 8 --profile-dir /tmp/prof
      grep -A12 "profile b" "$OUT/profile_k8_1b.log" | head -40
      lat profile_k8_8b --model llama-3.1-8b --batch 1 --num-scheduler-steps 8 --profile-dir /tmp/prof
      grep -A30 "profile b" "$OUT/profile_k8_8b.log" | head -34 ;;
    hostpath)
      lat host_two_programs --model llama-3.2-1b --batch 1 64 --profile-dir /tmp/prof
      lat host_device_put_inputs --model llama-3.2-1b --batch 1 64 --device-put-inputs
      lat host_decode_program --model llama-3.2-1b --batch 1 64 --decode-program --profile-dir /tmp/prof
      grep -h -A6 "profile b" "$OUT/host_two_programs.log" "$OUT/host_decode_program.log" | head -30
      timeout 150 python3 scripts/host_overhead.py --batch 1 64 --json "$OUT/host_overhead.json" \
        > "$OUT/host_overhead.log" 2>&1; grep -v "it/s" "$OUT/host_overhead.log" | tail -8 ;;
    norm)
      timeout 260 python3 scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b --batch 1 64 \
        --decode-attention fused --residual-norm off gpu --profile-dir /tmp/prof --hlo-dir "$OUT/hlo" --top 16 \
        --json "$OUT/forward_norm.json" > "$OUT/forward_norm.log" 2>&1
      grep -E "^\||kernels of|^ +[0-9.]+ us" "$OUT/forward_norm.log" | head -90
      lat norm_k8 --model llama-3.2-1b llama-3.1-8b --batch 1 64 --num-scheduler-steps 8 ;;
    splits)
      timeout 300 python3 scripts/bench_attention.py --decode-kernel-sweep --out "$OUT/decode_kernel_sweep.json" \
        > "$OUT/decode_kernel_sweep.log" 2>&1; grep -E "^\||device" "$OUT/decode_kernel_sweep.log" | head -60
      timeout 200 python3 scripts/bench_forward.py --model llama-3.2-1b --batch 1 64 --decode-attention fused \
        --residual-norm off gpu --json "$OUT/forward_norm_1b.json" > "$OUT/forward_norm_1b.log" 2>&1
      grep -E "^\|" "$OUT/forward_norm_1b.log" ;;
    engine) lat engine --model llama-3.1-8b llama-3.2-1b --batch 1 64 --num-scheduler-steps 8 ;;
    failing)  # the three compiled decode_matmul tests that failed in the twelfth session's kernels part
      (cd tests && timeout 150 python3 -m pytest -q test_decode_matmul.py -rf --tb=short \
         -k "normed_kernel_matches_reference or lowers_to_mosaic" > "$OUT/failing.log" 2>&1
       grep -E "^E |passed|failed|^FAILED" "$OUT/failing.log" | head -40) ;;
    abunroll)  # the multi-step program unrolled (no device loop) against the loop, engine at K = 8
      for u in ${UNROLLS:-0 1}; do
        JAXENGINE_MULTI_STEP_UNROLL=$u lat unroll${u}_1b --model llama-3.2-1b --batch 1 64 --num-scheduler-steps 8
        JAXENGINE_MULTI_STEP_UNROLL=$u lat unroll${u}_8b --model llama-3.1-8b --batch 1 64 --num-scheduler-steps 8
      done ;;
    chaintests)  # compiled decode-kernel tests: merged cases and the layer chain (count buffer reset)
      (cd tests && timeout 200 python3 -m pytest -q test_decode_attention.py test_multi_step.py -rf --tb=short \
         -k "merged or chain or gpu-decode-kernel or unroll" > "$OUT/chaintests.log" 2>&1
       grep -E "^E |passed|failed|^FAILED" "$OUT/chaintests.log" | head -30) ;;
    cbflags)  # XLA command-buffer modes for the multi-step program (bench_step, compiled programs only)
      for spec in "default|" "skiptemp|--xla_gpu_command_buffer_update_mode=SKIP_TEMP" \
          "while|--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
          "both|--xla_gpu_command_buffer_update_mode=SKIP_TEMP --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
          "whileunroll|--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_command_buffer_unroll_loops=true"; do
        name=${spec%%|*}; flags=${spec#*|}
        xf="${XLA_FLAGS:-} $flags"; xf=${xf# }
        env ${xf:+"XLA_FLAGS=$xf"} timeout 170 python3 scripts/bench_step.py --model ${CB_MODELS:-llama-3.2-1b llama-3.1-8b} \
          --batch 1 --steps 8 --no-warmup --iters 64 --json "$OUT/cb_$name.json" > "$OUT/cb_$name.log" 2>&1
        echo "-- $name: $flags"; grep -E "^\| llama|Error|error" "$OUT/cb_$name.log" | head -4
      done ;;
    absampler)  # the FULL sampler's top-k/top-p thresholds: sort against the 16-way search (bench_step)
      for f in sort search sort; do
        JAXENGINE_SAMPLER_FILTER=$f timeout 150 python3 scripts/bench_step.py --model llama-3.2-1b --batch 1 64 \
          --steps 8 --no-warmup --json "$OUT/sampler_$f.json" > "$OUT/sampler_$f.log" 2>&1
        echo "-- $f"; grep -E "^\| llama|Error|error" "$OUT/sampler_$f.log" | head -4
      done ;;
    abdispatch)  # device calls from one worker thread ($JAXENGINE_DISPATCH_THREAD) off / on, engine K = 8
      for d in 0 1; do
        JAXENGINE_DISPATCH_THREAD=$d lat dispatch$d --model llama-3.2-1b llama-3.1-8b --batch 1 64 --num-scheduler-steps 8
      done ;;
    kernelsweep)
      timeout 300 python3 scripts/bench_attention.py --decode-kernel-sweep --out "$OUT/decode_kernel_sweep.json" \
        > "$OUT/decode_kernel_sweep.log" 2>&1; grep -E "^\||device" "$OUT/decode_kernel_sweep.log" | head -60 ;;
    batches) lat batches --model llama-3.1-8b --batch 8 32 128 256 --kv-cache-gib 16 ;;
    long)
      lat long1024 --model llama-3.1-8b --batch 64 --input-len 1024 --output-len 128
      lat long4096 --model llama-3.1-8b --batch 8 --input-len 4096 --output-len 256 ;;
    qwen3) lat qwen3 --model qwen3-8b --batch 1 64 ;;
    samplerprof)  # the FULL sampler's kernels (bench_step --profile-dir), max_logprobs 20 then 16: XLA:GPU's
      # TopK kernel covers k <= 16; the logprobs' lax.top_k at k = 20 may be a sort of the vocabulary
      for spec in 20:top_k 16:top_k 20:chunks; do
        n=${spec%%:*}; t=${spec#*:}
        JAXENGINE_SAMPLER_TOPN=$t timeout 200 python3 scripts/bench_step.py --model llama-3.2-1b --batch 1 64 --steps 8 \
          --no-warmup --max-logprobs $n --profile-dir /tmp/sprof$n$t --top 12 --json "$OUT/samplerprof$n$t.json" \
          > "$OUT/samplerprof$n$t.log" 2>&1
        echo "-- max_logprobs $n, top-n $t"; grep -E "^\| llama|FULL sampler|^ +[0-9.]+ us|Error" "$OUT/samplerprof$n$t.log" | head -40
      done ;;
    topp)  # sampling as chat requests do (top_p without logprobs: the FILTER sampler), engine at K = 8
      lat topp --model llama-3.2-1b llama-3.1-8b --batch 1 64 --num-scheduler-steps 8 --temperature 0.7 --top-p 0.9
      timeout 150 python3 scripts/bench_step.py --model llama-3.2-1b --batch 1 64 --steps 8 --no-warmup \
        --json "$OUT/topp_step.json" > "$OUT/topp_step.log" 2>&1; grep -E "^\| llama|Error" "$OUT/topp_step.log" ;;
    unrollskip)  # the unrolled K-step program (no host-driven loop) with SKIP_TEMP command-buffer updates:
      # bench_step (1B/8B b1), then the engine at K = 8 (1B and 8B, b1/b64); the twelfth session's
      # unrolled 1B lost to ~3.5 ms of command-buffer updates a call under the default ALWAYS_UPDATE
      (xf="${XLA_FLAGS:-} --xla_gpu_command_buffer_update_mode=SKIP_TEMP"; export XLA_FLAGS=${xf# }
       export JAXENGINE_MULTI_STEP_UNROLL=0
       timeout 200 python3 scripts/bench_step.py --model llama-3.2-1b llama-3.1-8b --batch 1 --steps 8 --no-warmup \
         --iters 64 --json "$OUT/unrollskip_step.json" > "$OUT/unrollskip_step.log" 2>&1
       grep -E "^\| llama|Error" "$OUT/unrollskip_step.log" | head -4
       lat unrollskip --model llama-3.2-1b llama-3.1-8b --batch 1 64 --num-scheduler-steps 8) ;;
    longbudget)  # 8B 1024/128 at 64, K = 8, by prefill budget (max_num_batched_tokens): bigger GEMMs, fewer steps
      for b in ${BUDGETS:-2048 4096 8192}; do
        lat long1024_k8_budget$b --model llama-3.1-8b --batch 64 --input-len 1024 --output-len 128 \
          --num-scheduler-steps 8 --max-num-batched-tokens $b
      done ;;
    abprefill)  # the engine's prefill attention on the Triton long tile, then on the Mosaic GPU kernel
      # ($JAXENGINE_PREFILL_KERNEL): 8B 1024/128 at 64, K = 8, budget 8192 (8 prompts a prefill step)
      for k in ${PREFILL_KERNELS:-triton mgpu}; do
        JAXENGINE_PREFILL_KERNEL=$k lat abprefill_$k --model llama-3.1-8b --batch 64 --input-len 1024 \
          --output-len 128 --num-scheduler-steps 8 --max-num-batched-tokens 8192
      done ;;
    throughput8)  # the engine's serving config for throughput: multi-step K = 8, 8B then 1B
      for m in llama-3.1-8b llama-3.2-1b; do
        timeout 280 python3 scripts/bench_throughput.py --model $m --num-scheduler-steps 8 \
          --json "$OUT/throughput8_$m.json" > "$OUT/throughput8_$m.log" 2>&1; grep "^#" "$OUT/throughput8_$m.log"
      done ;;
    throughput)  # default buckets, then the finer set bucket_waste.py suggests, then multi-step
      timeout 280 python3 scripts/bench_throughput.py --model llama-3.1-8b --json "$OUT/throughput.json" \
        > "$OUT/throughput.log" 2>&1; tail -2 "$OUT/throughput.log"
      timeout 280 python3 scripts/bench_throughput.py --model llama-3.1-8b --json "$OUT/throughput_fine.json" \
        --token-buckets 8,16,32,64,128,256,512,768,1024,1536,2048 > "$OUT/throughput_fine.log" 2>&1
      tail -2 "$OUT/throughput_fine.log" ;;
    bgcompile)
      timeout 300 python3 scripts/bench_startup.py --model llama-3.1-8b --json "$OUT/bgstartup.json" \
        > "$OUT/bgstartup.log" 2>&1; tail -3 "$OUT/bgstartup.log"
      for b in ${BG_BUDGETS:-default 2048}; do
        flag=(); [ "$b" = default ] || flag=(--max-num-batched-tokens $b)
        echo "-- 8B 1024/128 x 64, K = 8, budget $b"
        lat bglong$b --model llama-3.1-8b --batch 64 --input-len 1024 --output-len 128 --num-scheduler-steps 8 "${flag[@]}"
      done ;;
    startup)
      timeout 560 python3 scripts/bench_startup.py --model llama-3.1-8b --also-warm JAXENGINE_COMPILE_THREADS=1 \
        --json "$OUT/startup.json" > "$OUT/startup.log" 2>&1; tail -6 "$OUT/startup.log"
      # the engine's default KV cache (0.9 of the memory left): the pool's concurrent autotuning with the least room
      timeout 300 python3 scripts/bench_startup.py --model llama-3.1-8b --kv-cache-gib 0 --json "$OUT/startup_fullkv.json" \
        > "$OUT/startup_fullkv.log" 2>&1; tail -4 "$OUT/startup_fullkv.log" ;;
    table)  # issue 3's whole table, device-timed, no sweeps
      timeout 570 python3 scripts/bench_attention.py --table --device-time --out "$OUT/attention_table.json" \
        > "$OUT/attention_table.log" 2>&1; grep -E "^\||device" "$OUT/attention_table.log" | head -120 ;;
    attention)
      timeout 560 python3 scripts/bench_attention.py --quick --out "$OUT/attention.json" \
        > "$OUT/attention.log" 2>&1; grep "^|" "$OUT/attention.log" | head -60 ;;
    kernels)
      # -v: each test's verdict as it finishes (the twelfth session's run hit the timeout after three
      # F's, with no summary to name them)
      (cd tests && timeout ${KERNELS_TIMEOUT:-420} python3 -m pytest -v test_ragged_paged_attention.py test_decode_attention.py \
        test_decode_matmul.py test_residual_norm.py -rf --tb=short > "$OUT/kernels.log" 2>&1
       grep -E "^E |[0-9]+ passed|failed|FAILED" "$OUT/kernels.log" | head -40) ;;
    tiles)
      timeout 300 python3 scripts/bench_attention.py --prefill-tiles --out "$OUT/prefill_tiles.json" \
        > "$OUT/prefill_tiles.log" 2>&1; grep -E "^\||device" "$OUT/prefill_tiles.log" | head -60 ;;
    longtiles)
      timeout 200 python3 scripts/bench_attention.py --long-tile-sweep --out "$OUT/long_tiles.json" \
        > "$OUT/long_tiles.log" 2>&1; grep -E "^\||device" "$OUT/long_tiles.log" | head -40 ;;
    decodeonly)
      timeout 200 python3 scripts/bench_attention.py --quick --decode-only --device-time --out "$OUT/decode_only.json" \
        > "$OUT/decode_only.log" 2>&1; grep -E "^\||device" "$OUT/decode_only.log" | head -30 ;;
    prefill)
      timeout 330 python3 scripts/bench_attention.py --prefill-sweep --out "$OUT/prefill.json" \
        > "$OUT/prefill.log" 2>&1; grep -E "^\||device" "$OUT/prefill.log" | head -90 ;;
    mgpumm)
      (cd tests && timeout 120 python3 -m pytest -q test_decode_matmul.py -rf --tb=short > "$OUT/mgpumm_tests.log" 2>&1
       grep -E "^E |passed|failed|^FAILED" "$OUT/mgpumm_tests.log" | head -20)
      timeout 250 python3 scripts/bench_matmul.py --plain --models llama-8b --ops qkv,o --rows 1,64 --sweep \
        --sweep-rows 1,64 --device-time --min-gib 1 --out "$OUT/matmul_plain_qkv_o.json" > "$OUT/matmul_plain_qkv_o.log" 2>&1
      grep -E "^\||device:|Error" "$OUT/matmul_plain_qkv_o.log" | head -90
      timeout 170 python3 scripts/bench_matmul.py --plain --models llama-8b --ops gate_up,down --rows 1,64 --sweep \
        --sweep-rows 64 --device-time --min-gib 1 --out "$OUT/matmul_plain_gu_down.json" > "$OUT/matmul_plain_gu_down.log" 2>&1
      grep -E "^\||Error" "$OUT/matmul_plain_gu_down.log" | head -60 ;;
    abmatmul)
      timeout 480 python3 scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b --batch 1 64 \
        --decode-attention fused --residual-norm gpu --decode-matmul xla mgpu xla --profile-dir /tmp/prof \
        --top 12 --json "$OUT/forward_matmul.json" > "$OUT/forward_matmul.log" 2>&1
      grep -E "^\||kernels of|^ +[0-9.]+ us|Error" "$OUT/forward_matmul.log" | head -200 ;;
    abmmengine)
      for dm in xla mgpu; do
        lat "mm_engine_$dm" --model llama-3.1-8b llama-3.2-1b --batch 1 64 --num-scheduler-steps 8 --decode-matmul $dm
      done ;;
    abnorm)
      (cd tests && JAXENGINE_MGPU_SS_SUM=chunks timeout 150 python3 -m pytest -q test_decode_matmul.py \
         -k "residual or normed or norm_in" -rf --tb=short > "$OUT/abnorm_tests.log" 2>&1
       grep -E "^E |passed|failed|^FAILED" "$OUT/abnorm_tests.log" | head -20)
      timeout 170 python3 scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b --batch 1 16 64 \
        --decode-attention fused --residual-norm gpu --decode-matmul mgpu_plain mgpu_norm mgpu_plain \
        --profile-dir /tmp/prof --top 10 --json "$OUT/forward_norm_mm.json" > "$OUT/forward_norm_mm.log" 2>&1
      grep -E "^\||kernels of|^ +[0-9.]+ us|idle|Error" "$OUT/forward_norm_mm.log" | head -200
      echo "-- JAXENGINE_MGPU_SS_SUM=chunks"
      JAXENGINE_MGPU_SS_SUM=chunks timeout 120 python3 scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b \
        --batch 1 16 64 --decode-attention fused --residual-norm gpu --decode-matmul mgpu_norm \
        --profile-dir /tmp/prof --top 6 --json "$OUT/forward_norm_chunks.json" > "$OUT/forward_norm_chunks.log" 2>&1
      grep -E "^\||kernels of|^ +[0-9.]+ us|idle|Error" "$OUT/forward_norm_chunks.log" | head -80
      lat norm_engine --model llama-3.1-8b --batch 1 64 --num-scheduler-steps 8 ;;
    abpdl)
      (cd tests && JAXENGINE_MGPU_PDL=1 timeout 150 python3 -m pytest -q test_decode_matmul.py \
         -k "matches_reference or pdl or norm_in" -rf --tb=short > "$OUT/abpdl_tests.log" 2>&1
       grep -E "^E |passed|failed|^FAILED" "$OUT/abpdl_tests.log" | head -20)
      i=0
      for v in 0 1 2 0; do
        i=$((i + 1)); fwd "forward_pdl$i" "JAXENGINE_MGPU_PDL=$v" --decode-matmul mgpu
      done
      JAXENGINE_MGPU_PDL=${PDL_ENGINE:-2} lat pdl_engine --model llama-3.1-8b llama-3.2-1b --batch 1 64 \
        --num-scheduler-steps 8 ;;
    abcombine)
      (cd tests && timeout 150 python3 -m pytest -q test_decode_attention.py test_ragged_paged_attention.py \
         -k "merged" -rf --tb=short > "$OUT/abcombine_tests.log" 2>&1; grep -E "^E |passed|failed|^FAILED" "$OUT/abcombine_tests.log" | head -20)
      i=0
      for v in separate kernel separate; do
        i=$((i + 1)); fwd "forward_combine$i" "JAXENGINE_DECODE_COMBINE=$v" --decode-matmul mgpu
      done
      for v in separate kernel; do
        JAXENGINE_DECODE_COMBINE=$v timeout 120 python3 scripts/bench_attention.py --decode-kernel-sweep --quick \
          --device-time --out "$OUT/decode_kernel_$v.json" > "$OUT/decode_kernel_$v.log" 2>&1
        echo "-- decode kernel, combine $v"; grep -E "^\|" "$OUT/decode_kernel_$v.log" | head -20
        JAXENGINE_DECODE_COMBINE=$v timeout 150 python3 scripts/bench_attention.py --quick --decode-only \
          --device-time --out "$OUT/decode_only_$v.json" > "$OUT/decode_only_$v.log" 2>&1
        echo "-- ragged kernel decode steps, combine $v"; grep -E "^\|" "$OUT/decode_only_$v.log" | grep -v reference
      done ;;
    abcluster)
      (cd tests && timeout 150 python3 -m pytest -q test_decode_matmul.py -k "cluster" -rf --tb=short \
         > "$OUT/abcluster_tests.log" 2>&1; grep -E "^E |passed|failed|^FAILED" "$OUT/abcluster_tests.log" | head -20)
      i=0
      for v in 1 0 1; do
        i=$((i + 1))
        env "JAXENGINE_MGPU_CLUSTER_SPLIT=$v" timeout 100 python3 scripts/bench_forward.py --model llama-3.2-1b \
          --batch 1 64 --decode-attention fused --residual-norm gpu --decode-matmul mgpu_plain mgpu_norm \
          --profile-dir /tmp/prof --top 8 --json "$OUT/forward_cluster$i.json" > "$OUT/forward_cluster$i.log" 2>&1
        echo "-- JAXENGINE_MGPU_CLUSTER_SPLIT=$v"; grep -E "^\||kernels of|^ +[0-9.]+ us|idle|Error" "$OUT/forward_cluster$i.log"
      done ;;
    steptime)
      timeout 150 python3 scripts/bench_forward.py --model llama-3.2-1b llama-3.1-8b --batch 1 64 \
        --decode-attention fused --residual-norm gpu --decode-matmul mgpu --profile-dir /tmp/prof --top 30 \
        --json "$OUT/steptime_forward.json" > "$OUT/steptime_forward.log" 2>&1
      grep -E "^\||kernels of|^ +[0-9.]+ us|idle|Error" "$OUT/steptime_forward.log" | head -90
      timeout 200 python3 scripts/bench_step.py --model llama-3.2-1b llama-3.1-8b --batch 1 64 --steps 8 \
        --profile-dir /tmp/prof --top 40 --json "$OUT/steptime_programs.json" > "$OUT/steptime_programs.log" 2>&1
      grep -E "^\||kernels of|^ +[0-9.]+ us|idle|Error" "$OUT/steptime_programs.log" | head -120
      lat steptime_engine --model llama-3.2-1b llama-3.1-8b --batch 1 --num-scheduler-steps 8 --profile-dir /tmp/prof
      grep -A45 "profile b" "$OUT/steptime_engine.log" | head -100 ;;
    decodesweep)
      timeout 200 python3 scripts/bench_attention.py --decode-sweep --device-time --out "$OUT/decode_sweep.json" \
        > "$OUT/decode_sweep.log" 2>&1; grep -E "^\||device" "$OUT/decode_sweep.log" | head -50 ;;
    abdecode)
      for v in new old; do
        site=/tmp/site; [ $v = old ] && site=${OLD_SITE:?set OLD_SITE}
        PYTHONPATH=$site timeout 200 python3 scripts/bench_attention.py --decode-kernel-sweep --quick --device-time \
          --out "$OUT/decode_kernel_$v.json" > "$OUT/decode_kernel_$v.log" 2>&1
        echo "-- $v: decode kernel"; grep -E "^\|" "$OUT/decode_kernel_$v.log"
        PYTHONPATH=$site timeout 150 python3 scripts/bench_attention.py --quick --decode-only --device-time \
          --out "$OUT/decode_only_$v.json" > "$OUT/decode_only_$v.log" 2>&1
        echo "-- $v: ragged kernel, decode steps"; grep -E "^\|" "$OUT/decode_only_$v.log" | grep -v reference
        PYTHONPATH=$site timeout 240 python3 scripts/bench_forward.py --model llama-3.2-1b llama-3.1-8b --batch 1 64 \
          --decode-attention fused --residual-norm gpu --json "$OUT/forward_$v.json" > "$OUT/forward_$v.log" 2>&1
        echo "-- $v: forward"; grep -E "^\|" "$OUT/forward_$v.log"
      done ;;
    xlaflags)
      i=0
      for f in "" "--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true" "--xla_gpu_enable_pdl=false"; do
        i=$((i + 1))
        XLA_FLAGS=$(echo ${XLA_FLAGS:-} $f) timeout 150 python3 scripts/bench_forward.py --model llama-3.2-1b llama-3.1-8b \
          --batch 1 64 --decode-attention fused --residual-norm gpu --json "$OUT/forward_flags$i.json" \
          > "$OUT/forward_flags$i.log" 2>&1
        echo "-- XLA_FLAGS=$f"; grep -E "^\|" "$OUT/forward_flags$i.log"
      done ;;
    fastmath)  # the ragged kernel's softmax exponent as PTX (fast_math: default on for tiles of 32-128 rows):
      # compiled ragged-kernel tests, then bench_attention --fast-math-ab --device-time (default / off / every tile)
      (cd tests && timeout ${KERNELS_TIMEOUT:-200} python3 -m pytest -v test_ragged_paged_attention.py -k gpu -x \
        -rf --tb=short > "$OUT/fastmath_tests.log" 2>&1
       grep -E "^E |[0-9]+ passed|failed|FAILED|rror" "$OUT/fastmath_tests.log" | head -20)
      timeout 330 python3 scripts/bench_attention.py --fast-math-ab --device-time --out "$OUT/fastmath.json" \
        > "$OUT/fastmath.log" 2>&1; grep -E "^\||ceilings|device:|rror" "$OUT/fastmath.log" ;;
    absplit)  # the decode kernel's kv splits as contiguous ranges against round robin ($JAXENGINE_DECODE_SPLIT_LAYOUT
      # in $LAYOUTS): compiled contiguous-layout tests, then the decode kernel sweep (--quick, device-timed) each way
      (cd tests && timeout 150 python3 -m pytest -q test_decode_attention.py -k "contiguous or split_layout" \
        > "$OUT/absplit_tests.log" 2>&1; tail -1 "$OUT/absplit_tests.log")
      for l in ${LAYOUTS:-round_robin contiguous}; do
        JAXENGINE_DECODE_SPLIT_LAYOUT=$l timeout 200 python3 scripts/bench_attention.py --decode-kernel-sweep --quick \
          --device-time --out "$OUT/absplit_$l.json" > "$OUT/absplit_$l.log" 2>&1
        echo "-- $l"; grep -E "^\| decode-kernel \| b(8|64)|rror" "$OUT/absplit_$l.log"
      done ;;
    absearch)  # the FILTER sampler's threshold search: ways x reduction ($JAXENGINE_SAMPLER_SEARCH_WAYS,
      # $JAXENGINE_SAMPLER_SEARCH_REDUCE) in $SEARCHES ("ways:reduce" words); bench_step 1B b1/b64, FILTER ms
      # column (fifteenth session: 0.19 / 0.79-0.82 ms at 16:broadcast, the default)
      for spec in ${SEARCHES:-16:broadcast 16:variadic 4:variadic 4:broadcast}; do
        w=${spec%%:*}; r=${spec#*:}
        JAXENGINE_SAMPLER_SEARCH_WAYS=$w JAXENGINE_SAMPLER_SEARCH_REDUCE=$r timeout 150 python3 scripts/bench_step.py \
          --model llama-3.2-1b --batch 1 64 --steps 8 --no-warmup --json "$OUT/absearch_${w}_$r.json" \
          > "$OUT/absearch_${w}_$r.log" 2>&1
        echo "-- ways $w, $r"; grep -E "^\| llama|Error" "$OUT/absearch_${w}_$r.log"
      done ;;
    abshort)  # the decode attention's fixed cost at batch 1 (~5.7 us device time a layer at ctx 256, eleventh
      # session; ~5% of the 8B and ~12% of the 1B batch-1 step): the kernel by tile at short contexts, then the
      # engine's K = 8 decode program (bench_step, context 256) with each tile of $TILES ("-" = default) in every layer
      timeout 240 python3 scripts/bench_attention.py --decode-short-sweep --device-time --out "$OUT/abshort_sweep.json" \
        > "$OUT/abshort_sweep.log" 2>&1; grep -E "^\| decode-kernel|rror" "$OUT/abshort_sweep.log"
      for tile in ${TILES:-- split_min_blocks=4}; do
        t=${tile//[=,]/_}
        for m in llama-3.2-1b llama-3.1-8b; do
          prof=(); [ "$tile" = - ] && prof=(--profile-dir /tmp/abshort_prof --top 40)  # the default's kernels a token
          JAXENGINE_DECODE_TILE=${tile#-} timeout 200 python3 scripts/bench_step.py --model $m --batch 1 --steps 8 \
            --no-warmup "${prof[@]}" --json "$OUT/abshort_${m}_$t.json" > "$OUT/abshort_${m}_$t.log" 2>&1
          echo "-- tile $tile"; grep -E "^\| llama|rror" "$OUT/abshort_${m}_$t.log"
        done
      done ;;
    abshorteng)  # the engine, 1B and 8B b1 (128/128, K = 8), with the decode tile $TILE in every layer
      for m in llama-3.2-1b llama-3.1-8b; do
        JAXENGINE_DECODE_TILE=${TILE:-split_min_blocks=4} lat abshorteng_$m --model $m --batch 1 --num-scheduler-steps 8
      done ;;
    prefill128)  # where the engine's one 128-token prefill step goes (8B b1 128/128: 7.2-7.8 ms against a 3.6 ms bound,
      # seventeenth/eighteenth sessions, the 0.2-0.3 points 8B b1 misses 88% by): bench_forward --prefill 128, device time
      # and kernels a step, 8B and 1B, XLA's GEMMs (the engine's default at 128 rows) then the Mosaic decode matmuls
      timeout 400 python3 scripts/bench_forward.py --model llama-3.1-8b llama-3.2-1b --prefill 128 --residual-norm gpu \
        --decode-matmul xla mgpu --iters 20 --profile-dir /tmp/prefill128 --top 30 --json "$OUT/prefill128.json" \
        > "$OUT/prefill128.log" 2>&1
      grep -E "^\| llama|kernels of|rror" "$OUT/prefill128.log" ;;
    abl2)  # L2 prefetch of a layer's next weights while its latency-bound kernels run ($JAXENGINE_L2_PREFETCH,
      # nineteenth session, off by default): the compiled prefetch tests, then bench_step's K = 8 program at batch 1
      # (--only-k; $BATCHES) for each model of $MODELS with each setting ("-" = off) of $L2S_1B / $L2S_8B
      (cd tests && timeout 150 python3 -m pytest -q -p no:cacheprovider test_decode_attention.py test_decode_matmul.py \
        -k "prefetch or l2_next or windows" > "$OUT/abl2_tests.log" 2>&1; tail -2 "$OUT/abl2_tests.log")
      for m in ${MODELS:-llama-3.2-1b llama-3.1-8b}; do
        if [ "$m" = llama-3.2-1b ]; then sets=${L2S_1B:-- mb=16 mb=24 qkv_mb=8,mb=16 qkv_mb=8,mb=16,o_mb=8 -}
        else sets=${L2S_8B:-- mb=12 mb=20 mb=28 -}; fi
        for s in $sets; do
          t=${s//[=,.]/_}
          JAXENGINE_L2_PREFETCH=${s#-} timeout 150 python3 scripts/bench_step.py --model $m --batch ${BATCHES:-1} --steps 8 \
            --no-warmup --only-k --json "$OUT/abl2_${m}_$t.json" > "$OUT/abl2_${m}_$t.log" 2>&1
          echo "-- $s"; grep -E "^\| llama|rror" "$OUT/abl2_${m}_$t.log"
        done
      done ;;
    abbucket)  # batch 1 on a 1-row bucket ($JAXENGINE_MIN_TOKEN_BUCKET=1, nineteenth session): the default 8-row bucket
      # runs 7 padding rows through every kernel (the decode attention's grid 8x the real row's programs, the padding
      # ones storing zeros and counting for the split merge); bench_step's K = 8 program at b1, 1B and 8B, min bucket
      # in $MINS (default "8 1 8"), then the engine at 1 if $ENGINE is set
      for m in ${MODELS:-llama-3.2-1b llama-3.1-8b}; do
        for mb in ${MINS:-8 1 8}; do
          JAXENGINE_MIN_TOKEN_BUCKET=$mb timeout 150 python3 scripts/bench_step.py --model $m --batch 1 --steps 8 \
            --no-warmup --only-k --json "$OUT/abbucket_${m}_$mb.json" > "$OUT/abbucket_${m}_$mb.log" 2>&1
          echo "-- min bucket $mb"; grep -E "^\| llama|rror" "$OUT/abbucket_${m}_$mb.log"
        done
        if [ -n "${ENGINE:-}" ]; then
          JAXENGINE_MIN_TOKEN_BUCKET=1 lat abbucket_engine_$m --model $m --batch 1 --num-scheduler-steps 8
        fi
      done ;;
    abl2eng)  # the engine, 1B and 8B b1 (128/128, K = 8), with $JAXENGINE_L2_PREFETCH=$L2 (default mb=16), then off
      for s in "${L2:-mb=16}" ""; do
        for m in llama-3.2-1b llama-3.1-8b; do
          JAXENGINE_L2_PREFETCH=$s lat "abl2eng_${m}_${s//[=,.]/_}" --model $m --batch 1 --num-scheduler-steps 8
        done
      done ;;
    abl2prof)  # bench_step's K = 8 program at batch 1 profiled (kernels a token), 1B and 8B, with $L2 (default mb=16)
      for m in llama-3.2-1b llama-3.1-8b; do
        JAXENGINE_L2_PREFETCH=${L2:-mb=16} timeout 200 python3 scripts/bench_step.py --model $m --batch 1 --steps 8 \
          --no-warmup --only-k --profile-dir /tmp/abl2_prof --top 40 --json "$OUT/abl2prof_$m.json" > "$OUT/abl2prof_$m.log" 2>&1
        grep -E "^\| llama|kernels of the k|rror" "$OUT/abl2prof_$m.log"; grep -E "decode_attention|matmul|gate_up" \
          "$OUT/abl2prof_$m.log" | head -12
      done ;;
    ab128)  # the 128-token bucket (8B b1's one prefill step: 7.2-7.4 ms against a 3.6 ms bound, seventeenth session)
      # on XLA's GEMMs against the Mosaic GPU decode matmuls: bench_forward 8B at 128 rows both ways, then the engine
      # 8B b1 (128/128, K = 8) with $JAXENGINE_FUSED_MATMUL_MAX_TOKENS 64 (default: XLA at 128) and 128
      timeout 200 python3 scripts/bench_forward.py --model llama-3.1-8b --batch 128 --decode-attention fused \
        --residual-norm gpu --decode-matmul xla mgpu --iters 20 --json "$OUT/ab128_forward.json" \
        > "$OUT/ab128_forward.log" 2>&1; grep -E "^\| llama|rror" "$OUT/ab128_forward.log"
      for t in 64 128; do
        JAXENGINE_FUSED_MATMUL_MAX_TOKENS=$t lat ab128_engine_$t --model llama-3.1-8b --batch 1 --num-scheduler-steps 8
      done ;;
    abpool)  # issue 3's batch-8 / 2k decode case with its 67 MB of K/V alone in a pool of that size (every
      # earlier run) against the same pages scattered in an 8 GiB pool, as in an engine ($POOLS: GiB, 0 = own pages)
      for g in ${POOLS:-0 8}; do
        timeout 200 python3 scripts/bench_attention.py --decode-kernel-sweep --quick --device-time --kv-pool-gib "$g" \
          --out "$OUT/abpool_$g.json" > "$OUT/abpool_$g.log" 2>&1
        echo "-- pool $g GiB"; grep -E "^\| decode-kernel \| b(1|8|64)|rror" "$OUT/abpool_$g.log"
      done
      # issue 3's own table (the ragged kernel and jax's paged_attention on decode steps) in the big pool
      timeout 200 python3 scripts/bench_attention.py --decode-only --quick --device-time --kv-pool-gib 8 \
        --out "$OUT/abpool_decode_only.json" > "$OUT/abpool_decode_only.log" 2>&1
      echo "-- decode-only, pool 8 GiB"; grep -E "^\| decode \||rror" "$OUT/abpool_decode_only.log" ;;
    loopcheck)  # whether XLA:GPU knows the K-step loop's trip count (then it reads no predicate back) and how long
      # the jitted K = 8 call takes to return against its run time (dispatching thread bypassed)
      for m in llama-3.2-1b llama-3.1-8b; do
        timeout 260 python3 scripts/bench_step.py --model $m --batch 1 64 --steps 8 --no-warmup --loop-check \
          --json "$OUT/loopcheck_$m.json" > "$OUT/loopcheck_$m.log" 2>&1
        grep -E "^\| llama|loop check|rror" "$OUT/loopcheck_$m.log"
      done ;;
    mgpuprefill)  # the Mosaic GPU prefill kernel (gpu_prefill: TMA + wgmma, written in the sixteenth session without
      # a GPU): its compiled tests, then bench_attention --mgpu-sweep --device-time (chunks 2k-8k: the engine's
      # path and the kernel by key block x ring depth, persistent or not, cuDNN beside; a Mosaic compile per config
      # and chunk).  `prefillcheck` has the mixed steps (its --prefill-tiles include the variant 2xmgpu)
      (cd tests && timeout 200 python3 -m pytest -q -x test_prefill_attention_mgpu.py -rf --tb=short \
        > "$OUT/mgpuprefill_tests.log" 2>&1; grep -E "^E |[0-9]+ passed|failed|FAILED|rror" "$OUT/mgpuprefill_tests.log" | head -20)
      timeout 320 python3 scripts/bench_attention.py --mgpu-sweep --device-time --out "$OUT/mgpusweep.json" \
        > "$OUT/mgpusweep.log" 2>&1; grep -E "^\| prefill|ceilings|rror" "$OUT/mgpusweep.log" ;;
    mgpuprobe)  # the Mosaic GPU decode kernel's first compiled run hung or compiled for minutes (twentieth session, H100:
      # no test finished in 200 s, no bench row in 4 min).  The kernel at probe levels 0-3 (q only; + the K/V ring's first
      # copies; + the loop without PV; all), each merge in its own subprocess under a timeout, each step's seconds
      # printed, so a timeout names the step ("compile" or "run") and the level; ptxas's report shows the compile ended.
      timeout 540 python3 scripts/mgpu_decode_probe.py --timeout 100 --dump "$OUT/mgpuprobe" \
        --out "$OUT/mgpuprobe.json" > "$OUT/mgpuprobe.log" 2>&1
      grep -vE "^    (small|b8) .* (lower|compile|run)$" "$OUT/mgpuprobe.log" | head -80 ;;
    mgpudecode)  # the Mosaic GPU decode kernel (gpu_decode_mgpu: TMA page ring + swap-AB wgmma, kv splits merged in
      # a cluster through distributed shared memory or by a combine kernel; written without a GPU, first compiled
      # here): its compiled tests (the cluster merge is checked against the reference only here), then the decode
      # table device-timed in one process: at b8 ctx 2k (issue 3: Triton decode kernel 24.1 us, 67%), b8 ctx 8k, b64
      # ctx 2k and b1 ctx 2k the Triton decode kernel (gpu_decode), the ragged kernel (gpu.py) and this kernel at its
      # default config with merge cluster and combine, and at b8 ctx 2k its DECODE_MGPU_SWEEP configs both ways.
      # The full table (batch 1/8/64 x context 512-32k): bench_attention.py --decode-mgpu --device-time
      (cd tests && timeout 240 python3 -m pytest -q -x test_decode_attention_mgpu.py -rf --tb=short \
        > "$OUT/mgpudecode_tests.log" 2>&1; grep -E "^E |[0-9]+ passed|failed|FAILED|rror" "$OUT/mgpudecode_tests.log" | head -20)
      timeout 320 python3 scripts/bench_attention.py --decode-mgpu --quick --device-time --out "$OUT/mgpudecode.json" \
        > "$OUT/mgpudecode.log" 2>&1; grep -E "^\| decode-mgpu|ceilings|device:|rror" "$OUT/mgpudecode.log" ;;
    prefillcheck)  # prefill attention device-timed (chunks 512-8192, cuDNN beside), with the GPU's clocks, power and
      # throttle reasons sampled during the run (fifteenth session: the same 4k chunk took 319 us under ncu on one
      # machine and 499-511 us device-timed on another, where cuDNN ran as usual)
      nvidia-smi dmon -s pc -d 1 > "$OUT/prefillcheck_dmon.log" 2>&1 & dm=$!
      timeout 300 python3 scripts/bench_attention.py --prefill-tiles --device-time --out "$OUT/prefillcheck.json" \
        > "$OUT/prefillcheck.log" 2>&1
      kill $dm 2>/dev/null
      nvidia-smi -q -d PERFORMANCE > "$OUT/prefillcheck_perf.txt" 2>&1
      grep -E "^\| prefill \| (chunk|2x)|ceilings|rror" "$OUT/prefillcheck.log"
      grep -iE "throttle|slowdown|capping|Active|Idle" "$OUT/prefillcheck_perf.txt" | head -20
      head -2 "$OUT/prefillcheck_dmon.log"; awk 'NR > 2 && $1 == 0' "$OUT/prefillcheck_dmon.log" | sort -n -k2 | tail -3 ;;
    ncu)  # Nsight Compute on the attention kernels (issue 3's misses): decode kernel b8 / b64 ctx 2k, prefill
      # 4k chunk; each case's details page (launch stats, occupancy, memory, warp stalls) in ncu_CASE.log,
      # the headline metrics printed.  $NCU_CASES overrides the cases ("case[:extra script args]" words).
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      [ -n "$NCU" ] || { echo "no ncu"; continue; }
      for spec in ${NCU_CASES:-decode-b8-ctx2048 decode-b64-ctx2048 decode-b8-ctx2048:--stages=3:--splits=4 prefill-4096}; do
        c=${spec%%:*}; extra=""; [ "$spec" != "$c" ] && extra=$(echo "${spec#*:}" | tr ':' ' ')
        tag=$(echo "$spec" | tr -c 'a-zA-Z0-9\n-' '_')
        case $spec in decode-*) k='regex:^decode_attention'; skip=1; cnt=1 ;;
                      *mgpu*) k='regex:prefill_attention_mgpu'; skip=1; cnt=1 ;;
                      *) k='regex:ragged_paged_attention'; skip=2; cnt=2 ;; esac
        # no preallocation: ncu saves and restores the device memory for each replay pass (75 s a case with
        # XLA's 75% of 139 GiB preallocated, fifteenth session)
        XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 240 "$NCU" --clock-control none --set full -k "$k" --launch-skip $skip --launch-count $cnt \
          python3 scripts/ncu_kernels.py --case $c $extra > "$OUT/ncu_$tag.log" 2>&1
        echo "-- $spec"
        grep -E "^  [a-z_]|case |Duration|DRAM Throughput|Memory Throughput|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Block Limit|Waves Per SM|Shared Memory Per Block|Grid Size|Block Size|L2 Hit|Stall|ERR|rror" "$OUT/ncu_$tag.log" | head -60
      done ;;
    hf-static)
      XLA_PYTHON_CLIENT_PREALLOCATE=false lat hf_static --model llama-3.1-8b --batch 1 64 --no-engine \
        --hf-peer static ;;
    hf-eager)
      XLA_PYTHON_CLIENT_PREALLOCATE=false lat hf_eager --model llama-3.2-1b llama-3.1-8b --batch 1 64 \
        --no-engine --hf-peer eager ;;
    *) echo "unknown part $part" ;;
  esac
done
echo "== done (t=$(( $(date +%s) - S )) s)"
if [ -n "${PACK:-}" ]; then
  tar czf /tmp/gpu_suite_all.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/gpu_suite_all.tgz "$OUT/all.tgz"
fi
