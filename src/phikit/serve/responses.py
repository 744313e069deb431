"""OpenAI response objects: completions, chat completions, their stream chunks, logprobs and usage."""
from __future__ import annotations

import json

from ..tokenizer import Tokenizer, piece_bytes
from .engine import TokenLogprob


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
                "bytes": list(piece_bytes(tokenizer.id_to_token(token_id) or ""))}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in tokens],
            "refusal": None}


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
