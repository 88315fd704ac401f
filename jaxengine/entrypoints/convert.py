"""`jaxengine convert SRC --out DIR`: a Hugging Face checkpoint dir -> an orbax checkpoint dir.

The params are loaded as LLM loads them (cast to --dtype, streamed tensor by tensor onto a tp mesh
when --tensor-parallel-size > 1 so no device holds more than its share) and saved with orbax;
config.json (its dtype set to the converted one), generation_config.json and the tokenizer files
are copied, so `LLM(model=DIR)` and `jaxengine serve DIR` take the directory as they take the
source.  Multi-host: run the same command on every host (each writes its shards; DIR must be a
shared filesystem or GCS path).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from typing import Sequence

logger = logging.getLogger(__name__)

# Everything of a HF dir except the weights: tokenizer files, chat templates, configs.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


def convert(src: str, out: str, tensor_parallel_size: int = 1, dtype: str = "auto",
            progress: bool = False) -> dict:
    """Convert `src` into an orbax checkpoint dir `out`; returns the marker's metadata."""
    import jax

    from jaxengine import models
    from jaxengine.config import ModelConfig
    from jaxengine.loader import checkpoint as ckpt
    from jaxengine.loader import orbax_ckpt

    src = os.path.expanduser(src)
    if ckpt.is_gguf(src):
        raise ValueError("convert reads Hugging Face checkpoint directories (config.json + safetensors); "
                         f"{src!r} is a .gguf file")
    if orbax_ckpt.is_orbax_dir(src):
        raise ValueError(f"{src!r} is already a converted orbax checkpoint")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ValueError("--out must differ from the source directory")
    hf_config = ckpt.load_hf_config(src)
    cfg = ModelConfig.from_hf_config(hf_config, dtype)
    module = models.get_model(cfg.architecture)
    mesh = None
    if tensor_parallel_size > 1 or jax.process_count() > 1:
        from jaxengine import sharding
        sharding.check_model(cfg, tensor_parallel_size)
        mesh = sharding.make_mesh(tensor_parallel_size, jax.device_count() // tensor_parallel_size
                                  if jax.process_count() > 1 else 1)

    def put(name, array):
        if mesh is None:
            return jax.device_put(array)
        return sharding.put_array(array, orbax_ckpt._storage_sharding(mesh, name, array.shape))

    t0 = time.perf_counter()
    params = ckpt.load_params(ckpt.iter_safetensors(src), module.param_shapes(cfg), cfg.dtype, put=put,
                              progress=progress)
    meta = {"dtype": cfg.dtype, "tensor_parallel_size": tensor_parallel_size, "source": os.path.abspath(src)}
    orbax_ckpt.save_params(params, out, meta)
    if jax.process_index() == 0:
        _copy_side_files(src, out, cfg.dtype, hf_config)
    logger.info("converted %s -> %s in %.1f s", src, out, time.perf_counter() - t0)
    return meta


def _copy_side_files(src: str, out: str, dtype: str, hf_config: dict) -> None:
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (not os.path.isfile(path) or name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES)
                or name == "config.json"):
            continue
        shutil.copy2(path, os.path.join(out, name))
    config = dict(hf_config)
    config["dtype"] = dtype  # dtype="auto" on the converted dir picks the converted dtype
    config.pop("torch_dtype", None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="Hugging Face checkpoint directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output directory of the orbax checkpoint")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="load onto this many devices while converting (the result serves any tp)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32", "float16"),
                        help="dtype of the saved params (auto: the checkpoint's)")
    return parser


def convert_main(argv: Sequence[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="jaxengine convert",
                                                   description="Convert a HF checkpoint to orbax."))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    convert(args.src, args.out, args.tensor_parallel_size, args.dtype, progress=True)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")  # CLI output
    return 0


if __name__ == "__main__":
    raise SystemExit(convert_main())
