"""PhiConfig: the numbers that define a phi model, and named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PhiConfig:
    vocab_size: int = 51200
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # Rows >= this index of the embedding/lm_head are padding and never sampled (None: all rows are real).
    tokenizer_vocab_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A config.json with a string, null or zero size would otherwise fail much later with a bare TypeError.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}: pick sizes where it is"
            )
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even: adjust partial_rotary_factor")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        # The tolerance keeps a phi-msft rotary_dim exact: 30 / 44 * 44 is 29.999999999999996, which int() makes 29.
        return int(self.partial_rotary_factor * self.head_dim + 1e-6)

    def num_parameters(self) -> int:
        """Exact parameter count (embedding, blocks, final LayerNorm, untied lm_head with bias)."""
        d, f, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        block = 2 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
        return v * d + n * block + 2 * d + (d * v + v)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 6N + 12*L*d*T for training, a third of that forward only."""
        t = seq_len or self.max_position_embeddings
        n = self.num_parameters() - self.vocab_size * self.hidden_size  # the embedding lookup is not a matmul
        fwd = 2 * n + 2 * self.num_hidden_layers * self.hidden_size * t
        return 3 * fwd if training else fwd

    # --- HF config.json (model_type "phi") ---
    def to_hf_dict(self) -> dict[str, Any]:
        prf = self.partial_rotary_factor
        if int(prf * self.head_dim) != self.rotary_dim:  # transformers takes int(), which would lose a channel pair
            prf = (self.rotary_dim + 0.5) / self.head_dim
        out = {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "partial_rotary_factor": prf,
            "rope_theta": self.rope_theta,
            "layer_norm_eps": self.layer_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "resid_pdrop": self.resid_pdrop,
            "embd_pdrop": self.embd_pdrop,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "hidden_act": "gelu_new",
            "qk_layernorm": False,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "dtype": "float32",
            # transformers >= 5 reads rope settings from here; older versions from the top-level keys above.
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": prf},
        }
        if self.tokenizer_vocab_size is not None:
            out["phikit_tokenizer_vocab_size"] = self.tokenizer_vocab_size
        out.update(self.extra)
        return out

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "PhiConfig":
        """Accept HF-native ("phi"), phi-msft ("phi-msft") and mixformer-sequential config.json fields."""
        g = lambda *keys, default=None: next((d[k] for k in keys if k in d and d[k] is not None), default)
        hidden = g("hidden_size", "n_embd")
        heads = g("num_attention_heads", "n_head")
        layers = g("num_hidden_layers", "n_layer")
        if hidden is None or heads is None or layers is None:
            raise ValueError("the config lacks hidden_size/n_embd, num_attention_heads/n_head or "
                             "num_hidden_layers/n_layer: is this a phi model?")
        for name, value in (("hidden_size", hidden), ("num_attention_heads", heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:  # head_dim below divides them
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        head_dim = hidden // heads
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported by phikit")
        d = {**{k: v for k, v in rope.items() if k in ("partial_rotary_factor", "rope_theta")}, **d}
        if "partial_rotary_factor" in d:
            prf = float(d["partial_rotary_factor"])
        elif "rotary_dim" in d:
            prf = d["rotary_dim"] / head_dim
        else:
            prf = 0.5
        if d.get("qk_layernorm"):
            raise ValueError("qk_layernorm (LayerNorms on queries and keys) is not part of phi: phikit cannot run it")
        act = g("hidden_act", "activation_function", default="gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ValueError(f"activation {act!r} is not the phi GELU (tanh): this is not a phi checkpoint")
        return cls(
            vocab_size=g("vocab_size", default=51200),
            hidden_size=hidden,
            intermediate_size=g("intermediate_size", "n_inner", default=4 * hidden),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            partial_rotary_factor=prf,
            rope_theta=float(g("rope_theta", default=10000.0)),
            layer_norm_eps=float(g("layer_norm_eps", "layer_norm_epsilon", default=1e-5)),
            max_position_embeddings=g("max_position_embeddings", "n_positions", default=2048),
            resid_pdrop=g("resid_pdrop", default=0.0),
            embd_pdrop=g("embd_pdrop", default=0.0),
            attention_dropout=g("attention_dropout", "attn_pdrop", default=0.0),
            initializer_range=g("initializer_range", default=0.02),
            bos_token_id=g("bos_token_id", default=50256),
            eos_token_id=g("eos_token_id", default=50256),
            tokenizer_vocab_size=g("phikit_tokenizer_vocab_size"),
        )

    def replace(self, **kw: Any) -> "PhiConfig":
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, dict[str, Any]] = {
    # The released models (DESIGN.md section 3).
    "phi-1": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                  partial_rotary_factor=0.5, tokenizer_vocab_size=50295),
    "phi-2": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
                  partial_rotary_factor=0.4, tokenizer_vocab_size=50295),
    # Small models for CPU work: same shape rules (head_dim 64 / rotary 32 for the phi-1.5 family).
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=2, partial_rotary_factor=0.5, max_position_embeddings=512),
    "cpu-small": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, partial_rotary_factor=0.5, max_position_embeddings=512),
    "cpu-base": dict(vocab_size=8192, hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                     num_attention_heads=6, partial_rotary_factor=0.5, max_position_embeddings=1024),
    "gpu-small": dict(vocab_size=51200, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, partial_rotary_factor=0.5, max_position_embeddings=2048,
                      tokenizer_vocab_size=50295),
}
PRESETS["phi-1_5"] = PRESETS["phi-1.5"] = PRESETS["phi-1"]  # phi-1.5 has phi-1's shape


def get_config(name: str, **overrides: Any) -> PhiConfig:
    """A named preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return PhiConfig(**{**PRESETS[name], **overrides})
