"""phikit: a toolkit for phi-style small language models."""
from .config import PRESETS, PhiConfig, get_config

__version__ = "0.1.0"


def __getattr__(name: str):
    # Everything that needs torch loads on first use, so `import phikit` (and `phikit --help`) stays quick.
    if name in ("PhiForCausalLM", "KVCache", "build_model"):
        from . import model
        return getattr(model, name)
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
