"""What a model says, shown rather than scored: one greedy sample per prompt format, and a scripted conversation."""
from __future__ import annotations


def sample_formats(chat_model, chat_tok, base_model, base_tok) -> dict[str, dict[str, str]]:
    """One sample per prompt format of the model cards, greedy, cut where each format says the answer ends."""
    from ..inference.decoding import generate
    from ..inference.formats import get_format
    user = "What is 7 + 5?"
    out = {}
    for name, model, tok in (("code", base_model, base_tok), ("qa", base_model, base_tok),
                             ("instruct", base_model, base_tok), ("chat", base_model, base_tok),
                             ("chatml", chat_model, chat_tok)):
        fmt = get_format(name)
        content = 'def add(a, b):\n    """Return the sum of a and b."""\n' if name == "code" else user
        prompt = fmt.render([{"role": "user", "content": content}])
        text = generate(model, tok, prompt, max_new_tokens=48, stop=fmt.stop_strings or None)
        out[name] = {"prompt": prompt, "completion": fmt.cut(text)}
    return out


def transcript(model, tokenizer, script: list[list[str]], max_new_tokens: int = 160) -> list[list[dict]]:
    """The model's greedy answers to scripted chats: each chat a list of user turns, each answered in order with
    the conversation so far. Returns the chats as OpenAI-style messages."""
    from .. import chat
    chats = []
    for turns in script:
        messages: list[dict] = []
        for user in turns:
            messages.append({"role": "user", "content": user})
            answer = chat(model, tokenizer, messages, max_new_tokens=max_new_tokens)
            messages.append({"role": "assistant", "content": answer.strip()})
        chats.append(messages)
    return chats
