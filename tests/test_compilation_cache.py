"""JAX's persistent compilation cache is on by default: a restart compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys
from jaxengine import LLM
from jaxengine.runner.compile_watch import persistent_cache_stats
llm = LLM(sys.argv[1], dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
          kv_cache_memory_bytes=1 << 20, skip_tokenizer_init=True, use_tqdm_on_load=False)
print(json.dumps({"buckets": len(llm.runner.buckets), **persistent_cache_stats()}))
"""


def start(ckpt: str, cache_dir: str) -> dict:
    env = {**os.environ, "JAXENGINE_COMPILATION_CACHE_DIR": cache_dir, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, ckpt], env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_restart_takes_every_program_from_the_persistent_cache(llama_ckpt, tmp_path):
    cache = str(tmp_path / "xla")
    cold = start(llama_ckpt, cache)
    assert cold["persistent_cache_misses"] >= cold["buckets"] and os.listdir(cache)
    warm = start(llama_ckpt, cache)
    assert warm["persistent_cache_misses"] == 0
    assert warm["persistent_cache_hits"] >= warm["buckets"]
