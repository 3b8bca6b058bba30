"""radixserve: an LLM serving engine that never computes the same prefix twice."""

from radixserve.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["Engine", "EngineConfig", "RequestOutput", "CompletionOutput", "StreamDelta", "SamplingParams"]


def __getattr__(name: str):
    # Lazy: `import radixserve` stays light (no torch) for the radix tree and replay.
    if name == "Engine":
        from radixserve.engine.engine import Engine

        return Engine
    if name == "EngineConfig":
        from radixserve.engine.config import EngineConfig

        return EngineConfig
    if name in ("RequestOutput", "CompletionOutput", "StreamDelta", "TokenLogprob"):
        from radixserve.engine import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'radixserve' has no attribute {name!r}")
