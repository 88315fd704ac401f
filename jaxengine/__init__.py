"""jaxengine: an LLM inference engine on JAX/XLA.

    from jaxengine import LLM, SamplingParams
    llm = LLM(model="/path/to/hf_checkpoint_dir")
    llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, max_tokens=64))
"""

from jaxengine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxengine.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name):
    # LLM and generate import jax: load them on first use so `import jaxengine` stays light.
    if name in ("LLM", "generate"):
        from jaxengine import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'jaxengine' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestMetrics", "CompletionOutput", "Logprob", "generate"]
