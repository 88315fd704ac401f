"""The user-facing API: text in, text out; chat; stop strings; bad input is refused clearly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import jaxengine
import tiny_checkpoints
from conftest import SMALL_ENGINE
from jaxengine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    return LLM(llama_ckpt, **SMALL_ENGINE)


def test_text_prompts_give_text_that_decodes_the_tokens(llm):
    outs = llm.generate(["the quick brown", {"prompt": "hello world"}],
                        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    tok = llm.get_tokenizer()
    for o, p in zip(outs, ["the quick brown", "hello world"]):
        assert o.prompt == p and o.prompt_token_ids == tok(p).input_ids
        c = o.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True) or \
            (tok.decode(o.prompt_token_ids + c.token_ids, skip_special_tokens=True).endswith(c.text) and c.text)


def test_stop_strings_end_the_output_and_are_trimmed(llm):
    base = llm.generate("the quick brown", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    assert len(base) > 4
    stop = base[2:4]
    out = llm.generate("the quick brown", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                         stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base[:base.index(stop)]


def test_stop_token_ids_end_the_output(llm):
    base = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    out = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                               stop_token_ids=[base[3]]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == base[3]
    assert out.token_ids == base[:base.index(base[3]) + 1]


def test_min_tokens_holds_back_eos(llm):
    # every token is a stop token, yet the first 5 cannot stop the request
    out = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=8, min_tokens=5,
                                               stop_token_ids=list(range(300))), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "stop"


def test_chat_applies_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=5, temperature=0.0),
                   use_tqdm=False)[0]
    assert out.prompt.endswith("assistant: ") and "user: hello" in out.prompt
    assert len(out.outputs[0].token_ids) >= 1


def test_logprobs_list_the_sampled_and_top_tokens(llm):
    c = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    assert len(c.logprobs) == 4
    for tok, entry in zip(c.token_ids, c.logprobs):
        assert tok in entry and entry[tok].rank == 1 and len(entry) == 3
        assert entry[tok].decoded_token is not None
        # real log-probabilities (read back as float32 bits beside the int32 ids): <= 0, best first,
        # the greedy token the most likely, a distribution's worth at most
        by_rank = sorted(entry.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in by_rank] == [1, 2, 3]
        assert all(-50 < lp.logprob <= 0 for lp in by_rank)
        assert by_rank[0].logprob >= by_rank[1].logprob >= by_rank[2].logprob
        assert sum(np.exp(lp.logprob) for lp in by_rank) <= 1 + 1e-5
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)),
                                                 abs=1e-4)


def test_sampling_defaults_come_from_generation_config(tmp_path):
    path = tiny_checkpoints.make_checkpoint(str(tmp_path / "m"), "llama", with_tokenizer=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": 0.3, "top_p": 0.7, "top_k": 11, "max_new_tokens": 5}, f)
    llm = LLM(path, **SMALL_ENGINE, warmup=False)
    p = llm.default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.3, 0.7, 11, 5)


def test_module_level_generate_returns_text(llama_ckpt):
    text = jaxengine.generate(llama_ckpt, "the quick", max_tokens=5, engine_kwargs=SMALL_ENGINE)
    assert isinstance(text, str)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, match", [
    (lambda: SamplingParams(max_tokens=0), "max_tokens"),
    (lambda: SamplingParams(top_p=0.0), "top_p"),
    (lambda: SamplingParams(top_p=1.5), "top_p"),
    (lambda: SamplingParams(temperature=-1), "temperature"),
    (lambda: SamplingParams(n=0), "n must"),
    (lambda: SamplingParams(top_k=-3), "top_k"),
    (lambda: SamplingParams(logprobs=-1), "logprobs"),
    (lambda: SamplingParams(logprobs=True), "logprobs"),
])
def test_bad_sampling_params_name_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("prompt, match", [
    ("", "empty"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": list(range(3, 200)) * 2}, "max_model_len"),
    ({"prompt_token_ids": [5, 10_000]}, "prompt_token_ids"),
    ({"nothing": 1}, "prompt"),
])
def test_bad_prompts_raise_and_the_engine_keeps_serving(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(["hello", prompt], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.kv_cache.num_free_pages == llm.kv_cache.num_pages
    assert llm.generate("hello", SamplingParams(max_tokens=3), use_tqdm=False)[0].finished


def test_logprobs_are_bounded_by_the_engines_max_logprobs(llm, llama_ckpt):
    """logprobs beyond LLM(max_logprobs=...) (20 by default, vLLM's) is a ValueError naming the
    field, and the engine keeps serving; an engine built with a larger max serves them."""
    with pytest.raises(ValueError, match="logprobs: 21 requested.*max_logprobs 20"):
        llm.generate(["hello", "world"], [SamplingParams(max_tokens=3), SamplingParams(max_tokens=3, logprobs=21)],
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.kv_cache.num_free_pages == llm.kv_cache.num_pages
    with pytest.raises(ValueError, match="max_logprobs"):
        LLM(llama_ckpt, **SMALL_ENGINE, max_logprobs=-1)
    wide = LLM(llama_ckpt, **SMALL_ENGINE, max_logprobs=24, warmup=False)
    assert wide.runner.num_logprobs == 24
    c = wide.generate("hello", SamplingParams(temperature=0.0, max_tokens=3, logprobs=24, ignore_eos=True),
                      use_tqdm=False)[0].outputs[0]
    assert [len(e) for e in c.logprobs] == [24] * 3
    assert all(sorted(lp.rank for lp in e.values()) == list(range(1, 25)) for e in c.logprobs)
    # the same top-3 as the default engine's
    want = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=3, logprobs=3, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    for e_wide, e in zip(c.logprobs, want.logprobs):
        top3 = {t for t, lp in e_wide.items() if lp.rank <= 3}
        assert len(e) == 3 and top3 == set(e)


def test_unknown_checkpoint_dir_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    path = tiny_checkpoints.make_checkpoint(str(tmp_path / "m"), "llama")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*LlamaForCausalLM"):
        LLM(path, skip_tokenizer_init=True)


def test_missing_tensor_names_itself(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = tiny_checkpoints.make_checkpoint(str(tmp_path / "m"), "llama")
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        LLM(path, skip_tokenizer_init=True, **{k: v for k, v in SMALL_ENGINE.items()})


def test_max_model_len_beyond_the_kv_cache_is_refused(llama_ckpt):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(llama_ckpt, **{**SMALL_ENGINE, "kv_cache_memory_bytes": 4 * 16384})


def _edit_checkpoint(path, config_update=None, add=None, drop=()):
    from safetensors.numpy import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, f)
    if config_update:
        cfg = json.load(open(os.path.join(path, "config.json")))
        cfg.update(config_update)
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))


def test_a_tensor_the_model_would_not_use_is_refused(tmp_path):
    import numpy as np

    path = tiny_checkpoints.make_checkpoint(str(tmp_path / "m"), "llama")
    _edit_checkpoint(path, add={"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match=r"o_proj\.bias"):
        LLM(path, skip_tokenizer_init=True, warmup=False, **SMALL_ENGINE)


def test_llama_attention_and_mlp_biases_are_loaded_and_used(tmp_path):
    import numpy as np

    plain = tiny_checkpoints.make_checkpoint(str(tmp_path / "plain"), "llama")
    biased = tiny_checkpoints.make_checkpoint(str(tmp_path / "biased"), "llama")
    rng = np.random.default_rng(0)
    cfg = json.load(open(os.path.join(biased, "config.json")))
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    add = {}
    for i in range(L):
        p = f"model.layers.{i}."
        for name, n in [("self_attn.q_proj", h), ("self_attn.k_proj", h), ("self_attn.v_proj", h),
                        ("self_attn.o_proj", h), ("mlp.gate_proj", f), ("mlp.up_proj", f), ("mlp.down_proj", h)]:
            add[p + name + ".bias"] = rng.normal(size=n).astype(np.float32) * 0.5
    _edit_checkpoint(biased, {"attention_bias": True, "mlp_bias": True}, add)
    prompt = {"prompt_token_ids": list(range(5, 30))}
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    a = LLM(plain, skip_tokenizer_init=True, **SMALL_ENGINE).generate(prompt, greedy, use_tqdm=False)
    llm_b = LLM(biased, skip_tokenizer_init=True, **SMALL_ENGINE)
    b = llm_b.generate(prompt, greedy, use_tqdm=False)
    assert a[0].outputs[0].token_ids != b[0].outputs[0].token_ids
    assert llm_b.runner.params["model"]["layers"]["1"]["self_attn"]["o_proj"]["bias"].shape == (h,)
    _edit_checkpoint(biased, drop=["model.layers.1.mlp.down_proj.bias"])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.bias"):
        LLM(biased, skip_tokenizer_init=True, warmup=False, **SMALL_ENGINE)
