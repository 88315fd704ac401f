"""Model parity with Hugging Face transformers, the ground truth for numerics.

Every tiny checkpoint family of tests/tiny_checkpoints.py is loaded through jaxengine's loader and
run through models/*.forward with the paged KV cache and the reference attention, then compared
with tests/golden/<family>.npz (made by scripts/make_golden.py: transformers, float32, eager):
    - one ragged prefill step of all prompts: logits at every prompt position
    - greedy decoding, one token per request per step: the exact golden tokens (and their logits)
    - the prompts prefilled in 2-3 chunks through the cache: the same logits
Where torch is importable, test_live_transformers_parity also runs transformers itself.

Tolerance: |jax - hf| <= LOGITS_ATOL = 3e-4 on logits of magnitude <= ~10 (std ~2).  Measured:
float32 noise (summation order, 1-ulp differences in cos/sin and llama3 rope frequencies) is
<= 7.5e-5 on CPU; an rms_norm_eps off by 10x moves logits by 3e-3 (qwen2) to 1e-2 (llama), a dropped bias,
norm weight or rope scaling by > 1e-1.  The smallest top-1/top-2 gap among golden greedy choices is
1.2e-3 (tests/golden/versions.json), so exact token equality is not at the mercy of rounding.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_checkpoints  # noqa: E402

from jaxengine.config import ModelConfig  # noqa: E402
from jaxengine.loader.checkpoint import iter_safetensors, load_hf_config, load_params  # noqa: E402
from jaxengine.models import get_model  # noqa: E402
from jaxengine.pallas_kernels.ragged_paged_attention import get_attention  # noqa: E402
from jaxengine.pallas_kernels.fused_matmul import get_matmul  # noqa: E402

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
FAMILIES = tiny_checkpoints.FAMILIES
SEED = 0
NEW_TOKENS = 16
LOGITS_ATOL = 3e-4

PAGE_SIZE = 16
PAGES_PER_SEQ = 4  # 64 tokens per request: longest prompt (40) + 16 generated
MAX_SEQS = 3
NUM_PAGES = 1 + MAX_SEQS * PAGES_PER_SEQ  # page 0 is never handed out: a stray write shows up
TOKEN_BUCKETS = (8, 128)  # decode steps, prefill steps; one compile each per family
# Prompt split points for chunked prefill, by prompt length: boundaries off the page grid.
CHUNK_SPLITS = {5: (2,), 23: (7, 15), 40: (16, 26)}


def load_golden(family: str) -> dict[str, list[np.ndarray]]:
    with np.load(os.path.join(GOLDEN_DIR, f"{family}.npz")) as z:
        n = len([k for k in z.files if k.startswith("prompt_")])
        return {kind: [z[f"{kind}_{i}"] for i in range(n)] for kind in ("prompt", "tokens", "logits")}


def golden_versions() -> dict:
    with open(os.path.join(GOLDEN_DIR, "versions.json")) as f:
        return json.load(f)


def assert_logits_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(actual, expected, atol=LOGITS_ATOL, rtol=0, err_msg=what)


# ----------------------------------------------------------------------------------- the runner
@dataclasses.dataclass
class Chunk:
    """Tokens of one request in one step: `tokens` at positions start, start+1, ..."""
    seq: int  # request slot 0..MAX_SEQS-1: owns pages 1 + seq*PAGES_PER_SEQ ...
    tokens: np.ndarray
    start: int


def page_table_row(seq: int) -> np.ndarray:
    return 1 + seq * PAGES_PER_SEQ + np.arange(PAGES_PER_SEQ, dtype=np.int32)


def build_batch(chunks: list[Chunk]) -> dict[str, np.ndarray]:
    """The flat, bucket-padded arrays of one ragged step (what the runner builds)."""
    num_tokens = sum(len(c.tokens) for c in chunks)
    bucket = next(b for b in TOKEN_BUCKETS if b >= num_tokens)
    input_ids = np.zeros(bucket, np.int32)
    positions = np.zeros(bucket, np.int32)
    slot_mapping = np.full(bucket, NUM_PAGES * PAGE_SIZE, np.int32)  # out of range: dropped
    kv_lens = np.zeros(MAX_SEQS, np.int32)
    page_indices = np.zeros((MAX_SEQS, PAGES_PER_SEQ), np.int32)
    cu_q_lens = np.zeros(MAX_SEQS + 1, np.int32)
    t = 0
    for i, c in enumerate(chunks):
        n = len(c.tokens)
        pos = c.start + np.arange(n, dtype=np.int32)
        row = page_table_row(c.seq)
        input_ids[t:t + n] = c.tokens
        positions[t:t + n] = pos
        slot_mapping[t:t + n] = row[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE
        kv_lens[i] = c.start + n
        page_indices[i] = row
        t += n
        cu_q_lens[i + 1] = t
    cu_q_lens[len(chunks) + 1:] = t
    logits_indices = np.zeros(bucket, np.int32)
    logits_indices[:t] = np.arange(t)
    return {"input_ids": input_ids, "positions": positions, "slot_mapping": slot_mapping,
            "kv_lens": kv_lens, "page_indices": page_indices, "cu_q_lens": cu_q_lens,
            "num_seqs": np.array([len(chunks)], np.int32), "logits_indices": logits_indices}


class TinyRunner:
    """Params, KV pages and one jitted step: the smallest thing that drives forward() like the engine."""

    def __init__(self, path: str, matmul=None, layout: str = "hf", decode_attention=None, residual_norm=None):
        self.cfg = ModelConfig.from_hf_config(load_hf_config(path), dtype="float32")
        self.model = get_model(self.cfg.architecture)
        self.params = load_params(iter_safetensors(path), self.model.param_shapes(self.cfg), "float32")
        if layout == "fused":
            from jaxengine.sharding import map_layers
            self.params = map_layers(self.params, lambda layer: self.model.fuse_layer_weights(layer, self.cfg))
            assert self.model.layout_of(self.params) == "fused"
        cfg, model, attention = self.cfg, self.model, get_attention("reference")
        self._step = jax.jit(lambda params, kv, batch: model.forward(params, cfg, batch, kv, attention,
                                                                     matmul=matmul, residual_norm=residual_norm))
        # decode-only steps (one token per request, row j = request j) through a decode_attention
        self._decode_step = None if decode_attention is None else jax.jit(
            lambda params, kv, batch: model.forward(params, cfg, batch, kv, attention,
                                                    decode_attention=decode_attention,
                                                    residual_norm=residual_norm))

    def new_cache(self) -> list[jax.Array]:
        shape = (NUM_PAGES, PAGE_SIZE, 2 * self.cfg.num_kv_heads, self.cfg.head_dim)
        return [jnp.zeros(shape, jnp.float32) for _ in range(self.cfg.num_layers)]

    def step(self, kv: list[jax.Array], chunks: list[Chunk]) -> tuple[list[np.ndarray], list[jax.Array]]:
        """Run one ragged step; returns each chunk's logits [len(tokens), vocab] and the new cache."""
        # GPUs default to TF32 for float32 matmuls; parity needs true float32.
        decode_only = all(len(c.tokens) == 1 and c.seq == i for i, c in enumerate(chunks))
        step = self._decode_step if decode_only and self._decode_step is not None else self._step
        with jax.default_matmul_precision("highest"):
            logits, kv = step(self.params, kv, build_batch(chunks))
        logits = np.asarray(logits)
        bounds = np.cumsum([0] + [len(c.tokens) for c in chunks])
        return [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:])], kv

    def prefill(self, prompts: list[np.ndarray], splits: dict[int, tuple[int, ...]] | None = None):
        """All prompts, in one step (splits None) or in chunks at `splits[len(prompt)]`."""
        kv = self.new_cache()
        pieces = [np.split(p, list((splits or {}).get(len(p), ()))) for p in prompts]
        logits: list[list[np.ndarray]] = [[] for _ in prompts]
        for k in range(max(len(ps) for ps in pieces)):
            chunks = [Chunk(seq, ps[k], sum(len(x) for x in ps[:k]))
                      for seq, ps in enumerate(pieces) if k < len(ps)]
            outs, kv = self.step(kv, chunks)
            for c, out in zip(chunks, outs):
                logits[c.seq].append(out)
        return [np.concatenate(per_seq) for per_seq in logits], kv

    def greedy(self, prompts: list[np.ndarray], new_tokens: int):
        """Greedy continuation of every prompt, decoded together one token per request per step."""
        prompt_logits, kv = self.prefill(prompts)
        tokens = [[int(lg[-1].argmax())] for lg in prompt_logits]
        step_logits = [[lg[-1]] for lg in prompt_logits]
        for i in range(1, new_tokens):
            chunks = [Chunk(seq, np.array([toks[-1]], np.int32), len(p) + i - 1)
                      for seq, (p, toks) in enumerate(zip(prompts, tokens))]
            outs, kv = self.step(kv, chunks)
            for seq, out in enumerate(outs):
                tokens[seq].append(int(out[0].argmax()))
                step_logits[seq].append(out[0])
        return [np.array(t, np.int32) for t in tokens], [np.stack(s) for s in step_logits]


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory):
    family = request.param
    path = tiny_checkpoints.make_checkpoint(str(tmp_path_factory.mktemp(family)), family, seed=SEED)
    return family, TinyRunner(path), load_golden(family)


@pytest.fixture(scope="module", params=FAMILIES)
def fused_family_run(request, tmp_path_factory):
    """The same, with every matmul through the fused Pallas kernels (interpret mode on CPU)."""
    family = request.param
    path = tiny_checkpoints.make_checkpoint(str(tmp_path_factory.mktemp(family)), family, seed=SEED)
    return family, TinyRunner(path, matmul=get_matmul("gpu")), load_golden(family)


# ----------------------------------------------------------------------------------- golden parity
def test_builder_reproduces_the_weights_the_golden_files_were_made_from():
    recorded = golden_versions()["families"]
    assert set(recorded) == set(FAMILIES)
    for family in FAMILIES:
        assert tiny_checkpoints.weights_sha256(family, SEED) == recorded[family]["weights_sha256"], family


def test_prefill_logits_match_transformers(family_run):
    family, runner, golden = family_run
    logits, _ = runner.prefill(golden["prompt"])
    for i, (prompt, expected) in enumerate(zip(golden["prompt"], golden["logits"])):
        assert_logits_close(logits[i], expected[:len(prompt)], f"{family} prompt {i} prefill logits")


def check_greedy_decode(family, runner, golden, what="decode"):
    tokens, step_logits = runner.greedy(golden["prompt"], NEW_TOKENS)
    for i, prompt in enumerate(golden["prompt"]):
        np.testing.assert_array_equal(tokens[i], golden["tokens"][i], err_msg=f"{family} prompt {i} tokens")
        assert_logits_close(step_logits[i], golden["logits"][i][len(prompt) - 1:],
                            f"{family} prompt {i} {what} logits")


def test_greedy_decode_through_paged_cache_matches_transformers(family_run):
    check_greedy_decode(*family_run)


def test_chunked_prefill_matches_one_step_prefill(family_run):
    family, runner, golden = family_run
    whole, _ = runner.prefill(golden["prompt"])
    chunked, _ = runner.prefill(golden["prompt"], CHUNK_SPLITS)
    for i, prompt in enumerate(golden["prompt"]):
        np.testing.assert_allclose(chunked[i], whole[i], atol=1e-5, rtol=1e-5,
                                   err_msg=f"{family} prompt {i}: chunked vs one-step prefill")
        assert_logits_close(chunked[i], golden["logits"][i][:len(prompt)], f"{family} prompt {i} chunked")


# ----------------------------------------------------------------------------------- live transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_live_transformers_parity(family, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers", minversion="5.0")  # reads config.json's rope_parameters
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoints.make_checkpoint(str(tmp_path), family, seed=SEED)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None  # always NEW_TOKENS tokens, as the golden files
    prompts = load_golden(family)["prompt"]
    runner = TinyRunner(path)
    tokens, _ = runner.greedy(prompts, NEW_TOKENS)
    for i, prompt in enumerate(prompts):
        ids = torch.from_numpy(prompt.astype(np.int64))[None]
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=NEW_TOKENS, pad_token_id=0)
            hf_tokens = out[0, len(prompt):].numpy()
            full = torch.cat([ids, torch.from_numpy(hf_tokens[:-1].astype(np.int64))[None]], dim=1)
            hf_logits = hf(full, use_cache=False).logits[0].float().numpy()
        np.testing.assert_array_equal(tokens[i], hf_tokens, err_msg=f"{family} prompt {i} live tokens")
        logits, _ = runner.prefill([full[0].numpy().astype(np.int32)])
        assert_logits_close(logits[0], hf_logits, f"{family} prompt {i} live logits")


# ----------------------------------------------------------------------------------- loader
def test_sharded_checkpoint_loads_the_same_params(tmp_path):
    family = "qwen2"  # biases and tied embeddings: the most tensor kinds
    single = tiny_checkpoints.make_checkpoint(str(tmp_path / "single"), family, seed=SEED)
    sharded = tiny_checkpoints.make_checkpoint(str(tmp_path / "sharded"), family, seed=SEED, sharded=True)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    cfg = ModelConfig.from_hf_config(load_hf_config(single), dtype="float32")
    shapes = get_model(cfg.architecture).param_shapes(cfg)
    a = load_params(iter_safetensors(single), shapes, "float32")
    b = load_params(iter_safetensors(sharded), shapes, "float32")
    flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert flat_a.keys() == flat_b.keys() and len(flat_a) == len(shapes)
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


def _shapes_of(path: str) -> dict[str, tuple[int, ...]]:
    cfg = ModelConfig.from_hf_config(load_hf_config(path), dtype="float32")
    return get_model(cfg.architecture).param_shapes(cfg)


def test_missing_tensor_is_named_in_the_error(tmp_path):
    path = tiny_checkpoints.make_checkpoint(str(tmp_path), "llama", seed=SEED)
    gone = "model.layers.1.mlp.up_proj.weight"
    source = ((n, a) for n, a in iter_safetensors(path) if n != gone)
    with pytest.raises(ValueError, match=gone.replace(".", r"\.")):
        load_params(source, _shapes_of(path), "float32")


def test_mis_shaped_tensor_is_named_in_the_error(tmp_path):
    path = tiny_checkpoints.make_checkpoint(str(tmp_path), "llama", seed=SEED)
    bad = "model.layers.0.self_attn.k_proj.weight"
    source = ((n, a[:-1] if n == bad else a) for n, a in iter_safetensors(path))
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        load_params(source, _shapes_of(path), "float32")


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        get_model("GPT2LMHeadModel")
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in str(err.value)


def test_tiny_tokenizer_loads_offline_and_fits_the_vocab(tmp_path):
    from jaxengine.loader.checkpoint import load_tokenizer

    path = tiny_checkpoints.make_checkpoint(str(tmp_path), "llama", seed=SEED, with_tokenizer=True)
    tok = load_tokenizer(path)
    assert len(tok) <= tiny_checkpoints.VOCAB
    assert (tok.bos_token_id, tok.eos_token_id) == (tiny_checkpoints.BOS_ID, tiny_checkpoints.EOS_ID)
    text = "Hello world, what is two plus two?"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == f"<s>user: {text}\nassistant: "


@pytest.fixture(scope="module", params=FAMILIES)
def fused_layout_family_run(request, tmp_path_factory):
    """The same, with the params in the "fused" layout (one q/k/v tensor, one gate/up tensor)."""
    family = request.param
    path = tiny_checkpoints.make_checkpoint(str(tmp_path_factory.mktemp(family)), family, seed=SEED)
    return family, TinyRunner(path, layout="fused"), load_golden(family)


def test_fused_layout_prefill_and_greedy_decode_match_transformers(fused_layout_family_run):
    family, runner, golden = fused_layout_family_run
    logits, _ = runner.prefill(golden["prompt"], CHUNK_SPLITS)
    for i, (prompt, expected) in enumerate(zip(golden["prompt"], golden["logits"])):
        assert_logits_close(logits[i], expected[:len(prompt)], f"{family} prompt {i} fused-layout prefill logits")
    check_greedy_decode(family, runner, golden, what="fused-layout decode")


def test_fused_layout_refuses_the_fused_matmul_kernels(fused_layout_family_run):
    family, runner, golden = fused_layout_family_run
    attention = get_attention("reference")
    with pytest.raises(ValueError, match="hf"):
        runner.model.forward(runner.params, runner.cfg, build_batch([Chunk(0, golden["prompt"][0], 0)]),
                             runner.new_cache(), attention, matmul=get_matmul("reference"))


@pytest.mark.parametrize("impl", ["reference", "gpu"])
def test_decode_attention_greedy_decode_matches_transformers(impl, tmp_path_factory):
    """Decode steps through the decode attention that rotates q/k and writes the KV slots itself
    (the multi-step programs' path): the composite of the reference ops, and the GPU kernel
    (interpret mode on CPU), every family (GQA, qk-norm, biases, sliding window, fused layout)."""
    from jaxengine.pallas_kernels.ragged_paged_attention import get_decode_attention
    for family in FAMILIES:
        path = tiny_checkpoints.make_checkpoint(str(tmp_path_factory.mktemp(family)), family, seed=SEED)
        runner = TinyRunner(path, layout="fused", decode_attention=get_decode_attention(impl))
        check_greedy_decode(family, runner, load_golden(family), what=f"{impl} decode-attention decode")


def test_residual_norm_kernel_greedy_decode_matches_transformers(tmp_path_factory):
    """The GPU engine's default decode path: every residual add + RMSNorm through the Pallas kernel
    (prefill and decode steps) and decode steps through the GPU decode attention, both in interpret
    mode on CPU (compiled on a GPU), every family."""
    from jaxengine.pallas_kernels.ragged_paged_attention import get_decode_attention
    from jaxengine.pallas_kernels.residual_norm import get_residual_norm
    for family in FAMILIES:
        path = tiny_checkpoints.make_checkpoint(str(tmp_path_factory.mktemp(family)), family, seed=SEED)
        runner = TinyRunner(path, layout="fused", decode_attention=get_decode_attention("gpu"),
                            residual_norm=get_residual_norm("gpu"))
        check_greedy_decode(family, runner, load_golden(family), what="residual-norm kernel decode")


def test_fused_matmul_greedy_decode_matches_transformers(fused_family_run):
    """matmul_impl="gpu" (RMSNorm, SwiGLU and residual adds inside the Pallas matmuls, every step
    here, prefill included) reproduces transformers' tokens and logits."""
    check_greedy_decode(*fused_family_run, what="fused decode")
