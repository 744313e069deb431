"""Prompt formats of the phi model cards, and where each one's answer ends.

The base phi models are not chat models: they continue text. Each format renders a conversation into the text
the model was trained to continue, and knows the strings that mark the start of "irrelevant text after the main
answer" (the model cards' warning), so the generator can stop there and `cut` can trim a finished output.

    code     a signature + docstring; the model writes the body (phi-1, phi-1.5, phi-2)
    qa       "{question}\\nAnswer:" (phi-1.5)
    instruct "Instruct: {question}\\nOutput:" (phi-2)
    chat     "Alice: ...\\nBob:" transcript, any two speaker names (phi-1.5, phi-2)
    chatml   <|im_start|>role\\n...<|im_end|> (instruction-tuned models)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..tokenizer import EOS_TOKEN, IM_END, IM_START

ROLES = ("system", "user", "assistant")


def check_messages(messages: Any) -> list[dict]:
    """OpenAI-style messages: a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content' keys, got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}: use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content']).__name__}")
    return list(messages)


@dataclass
class PromptFormat:
    """A way of writing a conversation as text, and the strings at which the answer is over."""

    name: str
    renderer: Callable[[list[dict], bool], str] = field(repr=False)
    stop_strings: list[str] = field(default_factory=list)
    stop_token_names: list[str] = field(default_factory=lambda: [EOS_TOKEN])
    # Code keeps its leading indentation; prose answers lose the space after "Answer:" and the like.
    strip_answer: bool = True

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.renderer(check_messages(messages), add_generation_prompt)

    def cut(self, text: str) -> str:
        """The answer part of a continuation: everything before the first stop string, trimmed."""
        ends = [i for i in (text.find(s) for s in self.stop_strings + self.stop_token_names) if i >= 0]
        text = text[:min(ends)] if ends else text
        return text.strip() if self.strip_answer else text.rstrip()


def _system_text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] == "system")


def _code(messages: list[dict], add_generation_prompt: bool) -> str:
    # The assistant's earlier turns were continuations of the user's code, so plain concatenation is the history.
    system = _system_text(messages)
    body = "".join(m["content"] for m in messages if m["role"] != "system")
    return f"{system}\n{body}" if system else body


def _labelled(question: str, answer: str) -> Callable[[list[dict], bool], str]:
    """Renderer for one-line-label formats: QA ("{q}\\nAnswer: {a}") and Instruct ("Instruct: {q}\\nOutput: {a}")."""

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        parts = []
        system = _system_text(messages)
        if system:
            parts.append(system + "\n\n")
        for m in messages:
            if m["role"] == "user":
                parts.append(f"{question}{m['content']}\n{answer}")
            elif m["role"] == "assistant":
                parts.append(f" {m['content'].strip()}\n\n")
        if messages[-1]["role"] == "user" and not add_generation_prompt:
            parts[-1] = parts[-1][: -len(answer) - 1]  # the question alone, no answer label
        return "".join(parts)

    return render


def _chat(user_name: str, assistant_name: str) -> Callable[[list[dict], bool], str]:
    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        lines = [m["content"] for m in messages if m["role"] == "system"]
        for m in messages:
            if m["role"] != "system":
                speaker = user_name if m["role"] == "user" else assistant_name
                lines.append(f"{speaker}: {m['content'].strip()}")
        text = "\n".join(lines)
        return text + f"\n{assistant_name}:" if add_generation_prompt else text

    return render


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The text of tokenizer.CHATML_TEMPLATE through transformers' apply_chat_template (SFT and DPO render with it)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + f"{IM_START}assistant\n" if add_generation_prompt else text


FORMAT_NAMES = ("code", "qa", "instruct", "chat", "chatml")


def get_format(name: str, user_name: str = "Alice", assistant_name: str = "Bob") -> PromptFormat:
    """The prompt format called `name` (one of FORMAT_NAMES); speaker names apply to "chat" only."""
    if name == "code":
        # The Codex/HumanEval stop sequences: a new top-level statement means the function is finished.
        return PromptFormat("code", _code, ["\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\n```"],
                            strip_answer=False)
    if name == "qa":
        return PromptFormat("qa", _labelled("", "Answer:"),
                            ["\nQuestion:", "\nAnswer:", "\nExercise", "\nInstruct:"])
    if name == "instruct":
        return PromptFormat("instruct", _labelled("Instruct: ", "Output:"),
                            ["\nInstruct:", "\nOutput:", "\nExercise"])
    if name == "chat":
        for who in (user_name, assistant_name):
            if not who or ":" in who or "\n" in who:
                raise ValueError(f"speaker name {who!r} must be non-empty, on one line and without ':'")
        if user_name == assistant_name:
            raise ValueError(f"the two speaker names must differ, both are {user_name!r}")
        return PromptFormat("chat", _chat(user_name, assistant_name),
                            [f"\n{user_name}:", f"\n{assistant_name}:"])
    if name == "chatml":
        # Without ChatML special tokens the markers arrive as plain text, so they are stop strings too.
        return PromptFormat("chatml", render_chatml, [IM_END, IM_START], [IM_END, EOS_TOKEN])
    raise ValueError(f"unknown prompt format {name!r}: choose one of {', '.join(FORMAT_NAMES)}")


def default_format(tokenizer) -> str:
    """ChatML for tokenizers that have its special tokens (instruction-tuned models), else the chat transcript."""
    return "chatml" if tokenizer.has_chatml else "chat"
