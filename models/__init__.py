"""Model families and the registry from Hugging Face `architectures` to the module that runs it."""

from __future__ import annotations

from types import ModuleType

from . import llama

# HF architecture name -> module with param_shapes / init_params / forward
_REGISTRY: dict[str, ModuleType] = {
    "LlamaForCausalLM": llama,
    "MistralForCausalLM": llama,
    "Qwen2ForCausalLM": llama,
    "Qwen3ForCausalLM": llama,
}

SUPPORTED_ARCHITECTURES = tuple(sorted(_REGISTRY))


def get_model(architecture: str) -> ModuleType:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; supported architectures: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}") from None
