"""Tiny, seeded Hugging Face checkpoints of every model family we run.

`make_checkpoint(path, family, seed)` writes a checkpoint directory that transformers loads as it
would a real one: config.json in the exact shape transformers 5 writes it for that model type,
model.safetensors (or two shards and an index), generation_config.json and, on request, a small
tokenizer.  Weights come from numpy's default_rng, whose normal draws are the same on every
platform, so a (family, seed) pair gives byte-identical files anywhere: the golden outputs in
tests/golden/ were made from these and stay valid without storing any weights.

This module imports numpy, safetensors and (for the tokenizer only) tokenizers, never jaxengine
or jax: scripts/make_golden.py runs it in a torch-only environment.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import numpy as np

# transformers version whose config.json layout the configs below reproduce.
TRANSFORMERS_FORMAT_VERSION = "5.23.0"

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB, MAX_POS = 64, 2, 4, 128, 256, 512
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0

# Weight scales (std of the normal draws), tuned so that greedy decoding is not degenerate (11-16
# distinct tokens in 16) and the top-1/top-2 logit gap of every golden greedy choice stays >= 1e-3.
# Embeddings small (as in real checkpoints), so rms_norm_eps matters in the first input norm and
# a wrong eps moves the logits well past the parity tolerance; projections 2.5/sqrt(fan_in) so the
# layers, not the embedding path, decide the next token; norm weights and biases random (not 1 /
# 0) so that a dropped norm weight or bias shows up in the logits.
EMBED_STD = 0.1
# Tied models read logits off the embedding matrix: larger so that logits have std ~2.  (At std ~1
# the token's own embedding dominates and greedy repeats the last token forever.)
TIED_EMBED_STD = 0.25
LINEAR_GAIN = 2.5  # std = LINEAR_GAIN / sqrt(fan_in)
LM_HEAD_STD = 0.25
NORM_STD = 0.2  # norm weights ~ 1 + NORM_STD * N(0, 1)
BIAS_STD = 0.2


def _llama_base(**over: Any) -> dict[str, Any]:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "dtype": "float32",
        "eos_token_id": EOS_ID,
        "head_dim": HIDDEN // HEADS,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POS,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "transformers_version": TRANSFORMERS_FORMAT_VERSION,
        "use_cache": True,
        "vocab_size": VOCAB,
    }
    cfg.update(over)
    return cfg


def _llama3_rope(factor: float) -> dict[str, Any]:
    # original_max_position_embeddings 16 (8192 in the real models) so that the llama3 frequency
    # remapping changes the logits at the short lengths the tests use.
    return {"factor": factor, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0, "rope_type": "llama3"}


def _mistral() -> dict[str, Any]:
    return {
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "dtype": "float32",
        "eos_token_id": EOS_ID,
        "head_dim": HIDDEN // HEADS,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POS,
        "model_type": "mistral",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": 2,
        "pad_token_id": None,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        # Mistral 7B v0.1 used 4096; 16 makes the window bite inside the 40-token test prompt.
        "sliding_window": 16,
        "tie_word_embeddings": False,
        "transformers_version": TRANSFORMERS_FORMAT_VERSION,
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def _qwen(model_type: str, **over: Any) -> dict[str, Any]:
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "Qwen3ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "dtype": "float32",
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "layer_types": ["full_attention"] * LAYERS,
        "max_position_embeddings": MAX_POS,
        "max_window_layers": LAYERS,
        "model_type": model_type,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": 2,
        "pad_token_id": None,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": False,
        "transformers_version": TRANSFORMERS_FORMAT_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }
    if model_type == "qwen3":
        # Qwen3 writes attention_bias and an explicit head_dim (128 with hidden 1024 in Qwen3-0.6B).
        cfg.update({"attention_bias": False, "head_dim": 32})
    cfg.update(over)
    return dict(sorted(cfg.items()))


CONFIGS: dict[str, dict[str, Any]] = {
    # Llama 2 style: untied, multi-head attention, default rope.
    "llama": _llama_base(),
    # Llama 3.1 style: GQA, rope_scaling "llama3".
    "llama3": _llama_base(num_key_value_heads=2, rope_parameters=_llama3_rope(8.0)),
    # Llama 3.2 1B style: tied embeddings, GQA, llama3 rope with factor 32.
    "llama32_tied": _llama_base(num_key_value_heads=2, rope_parameters=_llama3_rope(32.0),
                                tie_word_embeddings=True),
    "mistral": _mistral(),
    # Qwen2.5-0.5B style: bias on q/k/v, tied embeddings.
    "qwen2": _qwen("qwen2", tie_word_embeddings=True),
    # Qwen3 style: per-head RMSNorm on q and k, head_dim 32 != hidden / heads = 16.
    "qwen3": _qwen("qwen3"),
    # Multi-query attention: one KV head for four query heads.
    "mqa": _llama_base(num_key_value_heads=1),
    # head_dim 32 != hidden / heads = 16 (attention width 128 > hidden 64).
    "headdim": _llama_base(num_key_value_heads=2, head_dim=32),
}

FAMILIES: tuple[str, ...] = tuple(CONFIGS)


def hf_config(family: str) -> dict[str, Any]:
    if family not in CONFIGS:
        raise ValueError(f"unknown tiny checkpoint family {family!r}; known: {', '.join(FAMILIES)}")
    return copy.deepcopy(CONFIGS[family])


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor Hugging Face saves for this config, by name (independent of jaxengine)."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // hq
    qkv_bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (hq * d, h),
            p + "self_attn.k_proj.weight": (hkv * d, h),
            p + "self_attn.v_proj.weight": (hkv * d, h),
            p + "self_attn.o_proj.weight": (h, hq * d),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (hq * d,), p + "self_attn.k_proj.bias": (hkv * d,),
                           p + "self_attn.v_proj.bias": (hkv * d,)})
        if cfg["model_type"] == "qwen3":
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


def make_weights(family: str, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights, drawn in sorted-name order from default_rng(seed): platform independent."""
    cfg = hf_config(family)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in sorted(tensor_shapes(cfg).items()):
        z = rng.standard_normal(shape)  # float64, then scaled and rounded once to float32
        if name.endswith("norm.weight"):
            w = 1.0 + NORM_STD * z
        elif name.endswith(".bias"):
            w = BIAS_STD * z
        elif name == "model.embed_tokens.weight":
            w = (TIED_EMBED_STD if cfg["tie_word_embeddings"] else EMBED_STD) * z
        elif name == "lm_head.weight":
            w = LM_HEAD_STD * z
        else:
            w = (LINEAR_GAIN / np.sqrt(shape[1])) * z
        tensors[name] = np.ascontiguousarray(w.astype(np.float32))
    return tensors


def weights_sha256(family: str, seed: int = 0) -> str:
    """Digest of names, shapes and bytes of make_weights(family, seed): pins the golden files to them."""
    import hashlib

    h = hashlib.sha256()
    for name, w in sorted(make_weights(family, seed).items()):
        h.update(f"{name}:{w.dtype.str}:{w.shape};".encode())
        h.update(np.ascontiguousarray(w, dtype="<f4").tobytes())
    return h.hexdigest()


def _generation_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"_from_model_config": True, "bos_token_id": cfg["bos_token_id"],
            "eos_token_id": cfg["eos_token_id"], "transformers_version": TRANSFORMERS_FORMAT_VERSION}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def _write_safetensors(path: str, tensors: dict[str, np.ndarray], sharded: bool) -> None:
    from safetensors.numpy import save_file

    meta = {"format": "pt"}  # what transformers writes; its loader checks it
    if not sharded:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata=meta)
        return
    # Two shards split by name order, as save_pretrained(max_shard_size=...) would.
    names = sorted(tensors)
    half = len(names) // 2
    parts = [names[:half], names[half:]]
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(path, file), metadata=meta)
        weight_map.update({n: file for n in part})
    total = int(sum(t.nbytes for t in tensors.values()))
    _write_json(os.path.join(path, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


# ----------------------------------------------------------------------------------- tokenizer
TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello world! A tiny model for tests reads "
    "tiny prompts, writes tiny answers and says goodbye. user: what is two plus two? "
    "assistant: two plus two is four. 0123456789 ,.;:!?'\"()-_/+=*<>[]{}|@#$%^&~`\n"
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def _write_tokenizer(path: str, vocab_size: int) -> None:
    """A character-level BPE (printable ASCII + merges learned on TOKENIZER_TEXT), <= vocab_size."""
    from tokenizers import Tokenizer, decoders, models, trainers

    specials = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 = UNK_ID, BOS_ID, EOS_ID
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 160), special_tokens=specials,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    # No pre-tokenizer: the whole text is one "word", so spaces are tokens and decode is lossless.
    tok.train_from_iterator([TOKENIZER_TEXT], trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(os.path.join(path, "tokenizer.json"))
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "add_bos_token": False,
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": MAX_POS,
        "pad_token": "</s>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
    })
    _write_json(os.path.join(path, "special_tokens_map.json"),
                {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"})


def make_checkpoint(path: str, family: str, seed: int = 0, with_tokenizer: bool = False,
                    sharded: bool = False) -> str:
    """Write a tiny `family` checkpoint into directory `path` (created if needed); returns `path`."""
    cfg = hf_config(family)
    os.makedirs(path, exist_ok=True)
    _write_json(os.path.join(path, "config.json"), cfg)
    _write_json(os.path.join(path, "generation_config.json"), _generation_config(cfg))
    _write_safetensors(path, make_weights(family, seed), sharded)
    if with_tokenizer:
        _write_tokenizer(path, cfg["vocab_size"])
    return str(path)
