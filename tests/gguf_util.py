"""Write tiny GGUF files for tests, the way llama.cpp's convert_hf_to_gguf would.

`write_tiny_gguf` takes Hugging Face-named float32 tensors (made by `tiny_hf_tensors`), renames
them to llama.cpp's names, applies the q/k rotary permutation for llama, quantizes some of them and
writes a byte-level BPE tokenizer (trained here on a few sentences) and a chat template into the
metadata.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import gguf
import numpy as np

from jaxengine.loader.gguf import _GLOBAL_NAMES, _LAYER_NAMES, permute_rotary

Q = gguf.GGMLQuantizationType
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The capital of France is Paris.", "Hello world, hello there!", "the quick brown fox jumps over the lazy dog",
          "Paris is the capital and the largest city of France.", "numbers 0 1 2 3 4 5 6 7 8 9"] * 20

TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128)
# Per HF tensor kind, the GGUF type it is stored as: F32 where the test wants exact values (q/k
# prove the inverse permutation), quantized or F16 elsewhere.
STORAGE = {"embed_tokens": Q.Q8_0, "lm_head": Q.Q8_0, "q_proj": Q.F32, "k_proj": Q.F32, "v_proj": Q.F16,
           "o_proj": Q.Q8_0, "gate_proj": Q.Q4_0, "up_proj": Q.Q4_1, "down_proj": Q.Q8_0}


@functools.lru_cache(maxsize=1)
def reference_tokenizer() -> Any:
    """A 320-token byte-level BPE (tokenizers.Tokenizer) trained on CORPUS: what the GGUF must give back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of `reference_tokenizer`, as a GGUF stores them."""
    tok = reference_tokenizer()
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]  # 3 CONTROL, 1 NORMAL
    return tokens, types, merges


def tiny_hf_tensors(arch: str = "llama", tied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors under Hugging Face names for a tiny model of `arch`."""
    rng = np.random.default_rng(seed)
    h, n, kv, d, f = TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["head_dim"], TINY["intermediate"]
    vocab = len(tiny_vocab()[0])

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * 0.1

    out = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": 1 + w(h)}
    if not tied:
        out["lm_head.weight"] = w(vocab, h)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": 1 + w(h), p + "post_attention_layernorm.weight": 1 + w(h),
                    p + "self_attn.q_proj.weight": w(n * d, h), p + "self_attn.k_proj.weight": w(kv * d, h),
                    p + "self_attn.v_proj.weight": w(kv * d, h), p + "self_attn.o_proj.weight": w(h, n * d),
                    p + "mlp.gate_proj.weight": w(f, h), p + "mlp.up_proj.weight": w(f, h),
                    p + "mlp.down_proj.weight": w(h, f)})
        if arch == "qwen2":
            out.update({p + "self_attn.q_proj.bias": w(n * d), p + "self_attn.k_proj.bias": w(kv * d),
                        p + "self_attn.v_proj.bias": w(kv * d)})
        if arch == "qwen3":
            out.update({p + "self_attn.q_norm.weight": 1 + w(d), p + "self_attn.k_norm.weight": 1 + w(d)})
    return out


def storage_type(hf_name: str) -> Any:
    kind = hf_name.split(".")[-2]
    return STORAGE.get(kind, Q.F32) if hf_name.endswith(".weight") else Q.F32


def _gguf_name(hf_name: str) -> str:
    inverse_global = {v: k for k, v in _GLOBAL_NAMES.items()}
    if hf_name in inverse_global:
        return inverse_global[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    inverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
    return f"blk.{layer}.{inverse_layer[module]}.{suffix}"


def write_tiny_gguf(path: str, tensors: dict[str, np.ndarray], arch: str = "llama",
                    extra_tensors: dict[str, np.ndarray] | None = None, head_dim_key: bool | None = None,
                    rope_theta: float = 10000.0) -> None:
    tokens, types, merges = tiny_vocab()
    n, kv = TINY["heads"], TINY["kv_heads"]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(2048)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["intermediate"])
    w.add_head_count(n)
    w.add_head_count_kv(kv)
    if head_dim_key if head_dim_key is not None else arch == "qwen3":
        w.add_key_length(TINY["head_dim"])
        w.add_value_length(TINY["head_dim"])
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for hf_name, array in tensors.items():
        if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
            array = permute_rotary(array, n)
        elif arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
            array = permute_rotary(array, kv)
        qtype = storage_type(hf_name)
        if qtype == Q.F32:
            w.add_tensor(_gguf_name(hf_name), array.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(_gguf_name(hf_name), array.astype(np.float16))
        else:
            w.add_tensor(_gguf_name(hf_name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    for name, array in (extra_tensors or {}).items():
        w.add_tensor(name, array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def expected_after_roundtrip(hf_name: str, array: np.ndarray) -> np.ndarray:
    """What a lossless loader must return for `array`: itself, or its quantize/dequantize image."""
    qtype = storage_type(hf_name)
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).astype(np.float32)
