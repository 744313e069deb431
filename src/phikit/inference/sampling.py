"""Logit processing and token sampling shared by the generator, beam search and the server."""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        # Python callers can pass anything: a float count or a string seed would fail later inside torch.
        for name in ("max_new_tokens", "top_k") + (("seed",) if self.seed is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, Real) or isinstance(value, bool) or value != value:
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def mask_padding_rows(logits: torch.Tensor, vocab_limit: int | None) -> torch.Tensor:
    """Rows >= vocab_limit of a padded embedding (phi: 50295..51199) are never produced."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[..., vocab_limit:] = float("-inf")
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in `seen` [B, S] (divide positive logits, multiply negative ones)."""
    if penalty == 1.0 or seen is None or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   vocab_limit: int | None = None) -> torch.Tensor:
    """[B, V] raw logits -> [B, V] fp32 logits after penalty, temperature, top-k, top-p and min-p filtering."""
    logits = mask_padding_rows(logits.float(), vocab_limit)
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False  # the most likely token always stays (a top_p that rounds to 0 in fp32 kept none)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Processed [B, V] logits -> [B] token ids (argmax when greedy).

    Sampling inverts the cumulative distribution with one uniform number per row: the same distribution as
    torch.multinomial, which on CPU draws one random number per vocabulary entry (~100 ms for a [16, 50k]
    batch, many times a small model's whole decoding step).
    """
    if params.greedy:
        return logits.argmax(-1)
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), dtype=cdf.dtype, device=cdf.device, generator=generator) * cdf[:, -1:]
    # The first token whose cumulative probability exceeds u; zero-probability tokens can never be it.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
