"""phikit: a toolkit for phi-style small language models."""
from .config import PRESETS, PhiConfig, get_config
from .model import KVCache, PhiForCausalLM, build_model

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavier entry points load on first use, so `import phikit` stays quick.
    if name in ("load", "save"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name in ("generate", "stream", "chat"):
        from .inference import decoding
        return getattr(decoding, name)
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'phikit' has no attribute {name!r}")


__all__ = ["PhiConfig", "PRESETS", "get_config", "PhiForCausalLM", "KVCache", "build_model",
           "load", "save", "generate", "stream", "chat", "Tokenizer"]
