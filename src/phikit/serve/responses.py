"""OpenAI response objects: completions, chat completions, their stream chunks, logprobs and usage."""
from __future__ import annotations

import json
from functools import lru_cache

from ..tokenizer import Tokenizer
from .engine import TokenLogprob


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE writes each byte as a printable character; this maps the characters back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    """The raw bytes of one token (a token may hold part of a UTF-8 character, so its text can be lossy)."""
    piece = tokenizer.id_to_token(token_id) or ""
    table = _byte_level_table()
    if piece and all(c in table for c in piece):
        return [table[c] for c in piece]
    return list(piece.encode("utf-8"))  # added tokens (whitespace runs, specials) are stored as plain text


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def usage(prompt_tokens: int, completion_tokens: int, prediction: tuple[int, int] | None = None) -> dict:
    """OpenAI's usage object; with a prediction, how many predicted tokens the model kept and found wrong."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if prediction is not None:
        out["completion_tokens_details"] = {"accepted_prediction_tokens": prediction[0],
                                            "rejected_prediction_tokens": prediction[1]}
    return out


def completion_logprobs(tokenizer: Tokenizer, tokens: list[TokenLogprob], base_offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists of tokens, logprobs, top alternatives and text offsets."""
    def alternatives(t: TokenLogprob) -> dict:
        # OpenAI always adds the sampled token to the alternatives ("up to logprobs+1 elements"), so logprobs=0
        # and a sampled token outside the top k still appear there.
        top = {token_text(tokenizer, i): lp for i, lp in t.top}
        top.setdefault(token_text(tokenizer, t.token_id), t.logprob)
        return top

    return {
        "tokens": [token_text(tokenizer, t.token_id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [alternatives(t) for t in tokens],
        "text_offset": [base_offset + t.offset for t in tokens],
    }


def chat_logprobs(tokenizer: Tokenizer, tokens: list[TokenLogprob]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": token_bytes(tokenizer, token_id)}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens],
            "refusal": None}


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
