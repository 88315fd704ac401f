"""The `jaxengine` command: `serve` (an OpenAI-compatible server, like `vllm serve`) and `generate`.

Engine flags are derived from `LLM.__init__`'s signature, so every engine argument has a
`--kebab-case` flag with the same name, type and default as the Python argument and they never
drift apart.  Booleans come in pairs (`--enable-prefix-caching` / `--no-enable-prefix-caching`).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import types
import typing
from typing import Any, Sequence

# Help for each LLM(...) argument.  A test checks that every argument has an entry.
ENGINE_ARG_HELP: dict[str, str] = {
    "model": "Hugging Face checkpoint directory or a Llama-family .gguf file (same as the positional MODEL).",
    "tokenizer": "Tokenizer directory, when it is not the model's.",
    "dtype": "Weights and activations dtype: auto (the checkpoint's), bfloat16, float16 or float32.",
    "max_model_len": "Longest sequence (prompt + output) in tokens; default: the model's, capped by the KV cache.",
    "max_num_seqs": "Most requests in one running batch.",
    "max_num_batched_tokens": "Token budget of one engine step (prefill chunks and decodes together); default "
                              "8192 on a GPU (the buckets above 2048 compiled in the background), else 2048.",
    "kv_cache_memory_bytes": "KV-cache size in bytes (suffixes K, M, G, KiB, MiB, GiB accepted); "
                             "overrides --gpu-memory-utilization.",
    "gpu_memory_utilization": "Fraction of device memory the engine may use (weights + KV cache).",
    "block_size": "Tokens per KV-cache page.",
    "enable_prefix_caching": "Share KV pages between requests with a common prompt prefix.",
    "enable_chunked_prefill": "Split long prompts into chunks that share steps with decodes.",
    "seed": "Seed of the sampling of requests that bring no seed.",
    "skip_tokenizer_init": "Load no tokenizer: prompts must be token ids and outputs have no text.",
    "tensor_parallel_size": "Devices to shard each layer over (tensor parallelism).",
    "data_parallel_size": "Model replicas (data parallelism).",
    "compilation_cache_dir": "Persistent XLA compilation cache directory ('' disables it); default "
                             "$JAXENGINE_COMPILATION_CACHE_DIR or ~/.cache/jaxengine/xla.",
    "attention_impl": "Attention implementation: auto (by backend), reference (pure jnp), gpu, tpu.",
    "matmul_impl": "Matmuls of decode-sized steps: auto (= reference, XLA), reference, or gpu (fused "
                   "Pallas kernels with RMSNorm/SwiGLU/residual folded in; opt-in, slower than XLA so far).",
    "param_layout": "Params layout on the device: auto (= fused, or hf with --matmul-impl gpu), fused (q/k/v "
                    "and gate/up each one tensor: one GEMM apiece), hf (the checkpoint's tensors as they are).",
    "token_buckets": "Token-count buckets the step is compiled for (default: powers of two).",
    "warmup": "Compile every bucket at start-up, so serving never compiles.",
    "use_tqdm_on_load": "Show progress bars while loading and compiling.",
    "num_scheduler_steps": "Multi-step decoding: decode-only steps with greedy/temperature sampling run "
                           "this many tokens per device program (host work paid once per K tokens).",
    "fuse_decode_attention": "Decode programs (multi-step, --decode-program) rotate q/k, write the KV slots and "
                             "attend in one call (one Pallas kernel on GPU); default on "
                             "($JAXENGINE_FUSE_DECODE_ATTENTION=0 or --no-fuse-decode-attention: the general path).",
    "decode_program": "With --num-scheduler-steps 1: run decode-only steps as one device program (forward with "
                      "the fused decode attention + sampler) instead of two; opt-in ($JAXENGINE_DECODE_PROGRAM=1).",
    "residual_norm": "Residual add + RMSNorm as one kernel: auto (the Pallas kernel on GPU, XLA's ops elsewhere), "
                     "gpu, reference or off ($JAXENGINE_RESIDUAL_NORM).",
    "decode_matmul": "Matmuls of decode-sized steps: auto (mgpu on a Hopper GPU, else xla), xla, mgpu (the "
                     "Mosaic GPU TMA + wgmma weight-streaming kernels, one device, with the residual adds "
                     "and RMSNorms in their epilogues where measured faster), mgpu_norm (epilogues "
                     "always) or mgpu_plain (never); $JAXENGINE_DECODE_MATMUL.",
    "multi_step_unroll": "Iterations of the --num-scheduler-steps K decode program per trip of its device "
                         "loop: 1 (default) a loop of K trips, 0 the K iterations unrolled (no loop, but a "
                         "longer compile and, on GPUs, a command-buffer update per call); "
                         "$JAXENGINE_MULTI_STEP_UNROLL.",
    "background_compile_above": "Compile the token buckets above this size on a background thread after start-up, "
                                "the step budget growing to each as it is ready (default auto: 256 on a GPU, "
                                "2048 elsewhere; $JAXENGINE_BACKGROUND_COMPILE_ABOVE; 0: all before start-up).",
    "compile_threads": "Threads compiling the start-up's programs (lowered in turn, compiled or loaded from "
                       "the cache at once); default min(8, CPUs) on a GPU, else 1 ($JAXENGINE_COMPILE_THREADS).",
    "max_logprobs": "Most top logprobs a request may ask for (OpenAI logprobs / top_logprobs); every step that "
                    "serves logprobs, penalties or top-k/top-p computes this many (default 20).",
    "async_scheduling": "Schedule and dispatch step N+1 before reading back step N's tokens, so host "
                        "work overlaps the device (default on; --no-async-scheduling turns it off).",
    "load_format": "How to get weights: auto (from the checkpoint) or dummy (random, right shapes; benchmarks).",
}

_SIZE_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
                  "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text: str) -> int:
    """'1048576', '1MiB', '2G', '1.5GiB' -> bytes."""
    s = text.strip().lower().replace("_", "")
    for suffix in sorted(_SIZE_SUFFIXES, key=len, reverse=True):
        if s.endswith(suffix):
            return int(float(s[:-len(suffix)]) * _SIZE_SUFFIXES[suffix])
    return int(s)


def _llm_parameters() -> list[tuple[inspect.Parameter, Any]]:
    from jaxengine.llm import LLM

    hints = typing.get_type_hints(LLM.__init__)
    return [(p, hints.get(p.name)) for p in inspect.signature(LLM.__init__).parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the non-None type, is_sequence) of an annotation like `int | None` or `Sequence[int] | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    t = args[0] if args else str
    origin = typing.get_origin(t)
    if origin is not None and origin not in (typing.Union, types.UnionType):
        inner = typing.get_args(t)
        return (inner[0] if inner else str), True
    return t, False


def _int_or_word(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def add_engine_args(parser: argparse.ArgumentParser, skip: Sequence[str] = ("model",)) -> None:
    group = parser.add_argument_group("engine arguments (the LLM(...) constructor's)")
    for p, hint in _llm_parameters():
        if p.name in skip:
            continue
        flag = "--" + p.name.replace("_", "-")
        help_text = ENGINE_ARG_HELP.get(p.name, f"LLM({p.name}=...).")
        t, is_seq = _base_type(hint)
        default = p.default
        if t is bool:
            group.add_argument(flag, dest=p.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
            continue
        if p.name.endswith("_bytes"):
            t = parse_size
        elif _is_union(hint) and {int, str} <= set(typing.get_args(hint)):
            t = _int_or_word  # e.g. --background-compile-above auto / 512
        kwargs: dict[str, Any] = dict(dest=p.name, type=t, default=default, help=help_text)
        if is_seq:
            kwargs["nargs"] = "+"
        group.add_argument(flag, **kwargs)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {p.name: getattr(args, p.name) for p, _ in _llm_parameters()
            if p.name != "model" and hasattr(args, p.name)}


# ----------------------------------------------------------------------------------------- parser
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxengine", description="LLM inference on JAX: an OpenAI-compatible server and one-shot generation.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{serve,generate,convert}")

    serve = sub.add_parser("serve", help="start an OpenAI-compatible HTTP server (like `vllm serve`)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description="Serve MODEL over the OpenAI API: /v1/models, /v1/completions, "
                                       "/v1/chat/completions, /tokenize, /detokenize, /health, /metrics.")
    serve.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                       help="checkpoint directory or .gguf file; default: the bundled SmolLM2-135M-Instruct")
    serve.add_argument("--model", dest="model_flag", default=None, help=ENGINE_ARG_HELP["model"])
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients use in 'model'; the first is reported; default: MODEL as given")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 routes (or env JAXENGINE_API_KEY)")
    serve.add_argument("--max-waiting-requests", type=int, default=1024,
                       help="requests that may wait for a batch slot; more get HTTP 503")
    serve.add_argument("--disable-metrics", action="store_true", help="do not serve /metrics")
    serve.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    add_engine_args(serve)

    gen = sub.add_parser("generate", help="generate text for one prompt and print it",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         description="Generate a completion of --prompt (or stdin) and print it to stdout. "
                                     "With no MODEL, the bundled SmolLM2-135M-Instruct is used and the prompt "
                                     "goes through its chat template (see --chat).")
    gen.add_argument("model_pos", nargs="?", metavar="MODEL", default=None,
                     help="checkpoint directory or .gguf file; default: the bundled SmolLM2-135M-Instruct")
    gen.add_argument("--model", dest="model_flag", default=None, help=ENGINE_ARG_HELP["model"])
    gen.add_argument("--prompt", "-p", default=None, help="the prompt; read from stdin when omitted")
    gen.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    gen.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature (0 = greedy); default: the model's generation_config")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling; default: the model's")
    gen.add_argument("--top-k", type=int, default=None, help="top-k sampling (0 disables); default: the model's")
    gen.add_argument("--seed", dest="sampling_seed", type=int, default=None,
                     help="seed of the sampling (same output for the same seed); default: random")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="send the prompt as a user message through the chat template; default: on when "
                          "no MODEL is given (the default model is an instruct model), off otherwise")
    add_engine_args(gen, skip=("model", "seed"))  # --seed above seeds this one request

    from jaxengine.entrypoints import convert
    convert.add_arguments(sub.add_parser(
        "convert", help="convert a Hugging Face checkpoint to an orbax checkpoint directory",
        description="Convert a HF checkpoint dir to an orbax checkpoint dir that LLM(...) and `serve` load."))
    # The one-shot command has no use for a big batch; keep start-up (compiling buckets) short.
    gen.set_defaults(max_num_seqs=1, use_tqdm_on_load=False)
    return parser


def _model(args: argparse.Namespace) -> str | None:
    if args.model_pos and args.model_flag and args.model_pos != args.model_flag:
        raise SystemExit(f"jaxengine: error: MODEL given twice ({args.model_pos!r} and --model {args.model_flag!r})")
    return args.model_pos or args.model_flag


def _make_llm(args: argparse.Namespace) -> Any:
    from jaxengine.llm import LLM

    return LLM(_model(args), **engine_kwargs(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from jaxengine.entrypoints.openai_server import build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing is not news
    api_key = args.api_key or os.environ.get("JAXENGINE_API_KEY") or None
    model = _model(args)
    llm = _make_llm(args)
    if not llm.is_driver:  # multi-host worker: LLM() returned when process 0 shut down
        return 0
    names = args.served_model_name or [model if model is not None else os.path.basename(llm.config.model_path)]
    app = build_app(llm, names, api_key=api_key, max_waiting_requests=args.max_waiting_requests,
                    enable_metrics=not args.disable_metrics)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level, timeout_keep_alive=5)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxengine.sampling_params import SamplingParams

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise SystemExit("jaxengine: error: the prompt is empty (give --prompt or pipe text into stdin)")
    model = _model(args)
    chat = args.chat if args.chat is not None else model is None
    llm = _make_llm(args)
    if not llm.is_driver:  # multi-host worker: LLM() returned when process 0 shut down
        return 0
    overrides = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                   ("top_k", args.top_k), ("seed", args.sampling_seed)) if v is not None}
    params = SamplingParams.from_generation_config(llm.generation_config, max_tokens=args.max_tokens, **overrides)
    if chat:
        out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)
    else:
        out = llm.generate(prompt, params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import time

    from jaxengine.entrypoints import convert

    t0 = time.perf_counter()
    convert.convert(args.src, args.out, args.tensor_parallel_size, args.dtype, progress=True)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.version:
        import jaxengine
        print(jaxengine.__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"serve": cmd_serve, "generate": cmd_generate, "convert": cmd_convert}[args.command](args)
    except (ValueError, FileNotFoundError) as e:  # bad flags or paths: a message, not a traceback
        print(f"jaxengine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
