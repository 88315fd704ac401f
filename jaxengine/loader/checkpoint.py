"""Hugging Face checkpoint directories: config.json, safetensors (single or sharded), tokenizer.

Tensors stream one at a time: read from the memory-mapped safetensors file, cast to the target
dtype, put on device (into its sharding when one is given), and dropped from host memory, so the
host never holds the whole model.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

TensorSource = Iterator[tuple[str, np.ndarray]]


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")


def check_model_path(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model directory {path!r} has no config.json: not a Hugging Face checkpoint")


def load_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def load_hf_config(path: str) -> dict[str, Any]:
    check_model_path(path)
    return load_json(os.path.join(path, "config.json"))


def load_generation_config(path: str) -> dict[str, Any]:
    p = os.path.join(path, "generation_config.json")
    return load_json(p) if os.path.isfile(p) else {}


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(load_json(index)["weight_map"].values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"safetensors shards listed in the index are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    return [os.path.join(path, f) for f in files]


def iter_safetensors(path: str) -> TensorSource:
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_params(source: TensorSource, expected: dict[str, tuple[int, ...]], dtype: str,
                put: Callable[[str, np.ndarray], jax.Array] | None = None,
                progress: bool = False) -> dict[str, Any]:
    """Stream tensors from `source` into a nested params dict of device arrays.

    expected: name -> shape of every tensor the model needs.  Rotary caches and a tied lm_head are
    skipped; any other tensor the model would not use is an error (silently dropping, say, a bias
    would give wrong outputs).  `put` places one tensor (default: jax.device_put on the default
    device); sharding/ passes one that puts each tensor straight into its NamedSharding.
    """
    from jaxengine.models.llama import unflatten  # generic nested-dict helper

    target = jnp.dtype(dtype)
    put = put or (lambda name, arr: jax.device_put(arr))
    flat: dict[str, jax.Array] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(expected), desc="Loading weights", unit="tensor")
    for name, array in source:
        if name not in expected:
            if name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight":
                continue
            raise ValueError(f"checkpoint tensor {name!r} is not used by this model "
                             "(an unsupported variant of the architecture?)")
        if tuple(array.shape) != tuple(expected[name]):
            raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(expected[name])}")
        flat[name] = put(name, np.asarray(array).astype(target, copy=False))
        del array
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    missing = sorted(set(expected) - set(flat))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint is missing tensor(s): {', '.join(missing[:5])}{more}")
    return unflatten(flat)


def load_tokenizer(path: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
