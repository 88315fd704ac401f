"""Golden outputs of Hugging Face transformers for every tiny checkpoint family.

    python scripts/make_golden.py [--out tests/golden] [--families llama qwen3 ...]

Needs torch + transformers (no jax): it builds each family's checkpoint with
tests/tiny_checkpoints.py, runs transformers in float32 with eager attention on fixed prompts, and
writes tests/golden/<family>.npz:
    prompt_<i>  i32[L]            the prompt token ids
    tokens_<i>  i32[NEW_TOKENS]   greedy continuation (generate(do_sample=False), eos ignored)
    logits_<i>  f32[L + NEW_TOKENS - 1, vocab]
                logits of one forward pass over prompt + tokens[:-1]: row j predicts token j + 1,
                so rows L-1.. are the logits that chose each generated token
plus tests/golden/versions.json (library versions, seed, prompts).  tests/test_parity.py compares
jaxengine against these.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import tiny_checkpoints  # noqa: E402  (plain numpy/safetensors; never imports jaxengine)

SEED = 0
NEW_TOKENS = 16
PROMPT_LENGTHS = (5, 23, 40)  # 40 + 16 spans four 16-token pages; 23 ends mid-page


def prompts(vocab_size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    # Ids >= 3 so that no prompt token is <unk>/<s>/</s>.
    return [rng.integers(3, vocab_size, size=n).astype(np.int32) for n in PROMPT_LENGTHS]


def run_family(family: str, path: str) -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tiny_checkpoints.make_checkpoint(path, family, seed=SEED)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    # No eos: always NEW_TOKENS tokens, so the comparison never depends on stop rules.  generate()
    # fills unset fields from model.generation_config, so eos must go from there too (min_new_tokens
    # would instead mask eos out of the logits and change the greedy choice).
    model.generation_config.eos_token_id = None
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS,
                               eos_token_id=None, pad_token_id=0, bos_token_id=None)
    out: dict[str, np.ndarray] = {}
    stats = []
    for i, prompt in enumerate(prompts(model.config.vocab_size)):
        ids = torch.from_numpy(prompt.astype(np.int64))[None]
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
            tokens = seq[0, len(prompt):].numpy().astype(np.int32)
            assert len(tokens) == NEW_TOKENS, (family, i, tokens)
            full = torch.cat([ids, torch.from_numpy(tokens[:-1].astype(np.int64))[None]], dim=1)
            logits = model(full, use_cache=False).logits[0].float().numpy()
        # The cached generate loop and one uncached forward must agree on every greedy choice.
        chosen = logits[len(prompt) - 1:].argmax(-1)
        assert (chosen == tokens).all(), (family, i, chosen, tokens)
        top2 = np.sort(logits[len(prompt) - 1:], axis=-1)[:, -2:]
        stats.append({"prompt_len": int(len(prompt)), "distinct_tokens": int(len(set(tokens.tolist()))),
                      "min_top1_top2_gap": float((top2[:, 1] - top2[:, 0]).min()),
                      "logits_std": float(logits.std())})
        out[f"prompt_{i}"] = prompt
        out[f"tokens_{i}"] = tokens
        out[f"logits_{i}"] = logits.astype(np.float32)
    return out, stats


def main() -> None:
    import safetensors
    import tokenizers
    import torch
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "golden"))
    ap.add_argument("--families", nargs="*", default=list(tiny_checkpoints.FAMILIES))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    all_stats = {}
    for family in args.families:
        with tempfile.TemporaryDirectory() as tmp:
            arrays, stats = run_family(family, tmp)
        np.savez_compressed(os.path.join(args.out, f"{family}.npz"), **arrays)
        all_stats[family] = {"weights_sha256": tiny_checkpoints.weights_sha256(family, SEED),
                             "prompts": stats}
        print(family, json.dumps(stats), flush=True)
    info = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
        "attn_implementation": "eager",
        "dtype": "float32",
        "seed": SEED,
        "new_tokens": NEW_TOKENS,
        "prompt_lengths": list(PROMPT_LENGTHS),
        "families": all_stats,
    }
    with open(os.path.join(args.out, "versions.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
