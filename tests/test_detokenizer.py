"""Incremental detokenization: multi-byte characters, stop strings, special tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxengine.engine.detokenizer import IncrementalDetokenizer

TEXT = "héllo wörld 世界 🙂 naïve café — ünïcödé ok. 日本語のテキスト 🚀🚀 done"


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE with few merges, so multi-byte characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world ok done"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def stream(tok, ids, **kw):
    d = IncrementalDetokenizer(tok, [], **kw)
    texts, stop = [], None
    for t in ids:
        stop = d.add_token(t)
        texts.append(d.visible_text(finished=stop is not None))
        if stop:
            break
    return d, texts, stop


def test_streamed_text_equals_the_full_decode_for_multibyte_characters(byte_tokenizer):
    ids = byte_tokenizer(TEXT).input_ids
    assert len(ids) > len(TEXT)  # characters really span tokens
    d, texts, _ = stream(byte_tokenizer, ids)
    assert d.output_text == TEXT
    assert all("\ufffd" not in t for t in texts), "a half character was emitted"
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "text only grows"


def test_a_stop_string_is_trimmed_and_never_shown(byte_tokenizer):
    ids = byte_tokenizer(TEXT).input_ids
    d, texts, stop = stream(byte_tokenizer, ids, stop=["世界"])
    assert stop == "世界"
    assert d.output_text == "héllo wörld "
    assert all("世" not in t for t in texts)


def test_include_stop_str_in_output(byte_tokenizer):
    d, _, stop = stream(byte_tokenizer, byte_tokenizer("abc stop here").input_ids, stop=["stop"],
                        include_stop_str_in_output=True)
    assert stop == "stop" and d.output_text == "abc stop"


def test_special_tokens_are_skipped_or_kept(byte_tokenizer):
    ids = byte_tokenizer("ok").input_ids + [byte_tokenizer.eos_token_id]
    assert stream(byte_tokenizer, ids)[0].output_text == "ok"
    assert stream(byte_tokenizer, ids, skip_special_tokens=False)[0].output_text == "ok</s>"


def test_the_first_output_token_keeps_its_leading_space(llama_ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_ckpt)
    prompt = tok("the quick brown").input_ids
    out = tok(" fox jumps", add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tok, prompt)
    for t in out:
        d.add_token(t)
    assert d.output_text == tok.decode(prompt + out, skip_special_tokens=True)[len(tok.decode(
        prompt, skip_special_tokens=True)):]
