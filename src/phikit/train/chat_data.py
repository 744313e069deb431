"""Conversations for instruction tuning: the common file shapes, ChatML rendering, assistant-only loss masks,
packing with segment ids, and the ChatML special tokens in a model's embedding.

Shapes read (one record per JSONL line, a JSON list, or Parquet rows):
    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}      OpenAI
    {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}        ShareGPT / OpenHermes-2.5
    {"instruction": ..., "input": ..., "output": ...}  or  {"prompt": ..., "response"|"completion": ...}
A top-level "system" string becomes the system message when the conversation has none.

The loss covers every assistant turn's content and its closing <|im_end|> (so the model learns to stop), nothing
else. Token ids are those of the whole rendered text, so they equal transformers' apply_chat_template.
"""
from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..inference.formats import render_chatml
from ..tokenizer import IM_END, IM_START, Tokenizer
from .losses import IGNORE_INDEX  # label of tokens outside the loss


# ShareGPT/OpenHermes speaker names and their OpenAI roles.
ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
}
BAD_DATA_POLICIES = ("skip", "error")
TOO_LONG_POLICIES = ("skip", "truncate", "error")


class BadExample(ValueError):
    """One record that cannot be used; `kind` names the problem for the data report."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------- reading files
def read_records(path: str | Path) -> Iterator[Any]:
    """Records of a .jsonl, .json (a list of objects) or .parquet file. A JSONL line that is not valid JSON comes
    out as a BadExample("malformed") in its place, so the --on-bad policy counts or stops on it like any bad record."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist: pass a .jsonl, .json or .parquet file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        yield from pq.read_table(path).to_pylist()
        return
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of records (or use .jsonl, one record per line)")
        yield from data
        return
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield BadExample("malformed", f"line {line_no} is not valid JSON ({e.msg}, column {e.colno})")


# ---------------------------------------------------------------- conversation shapes
def _message(turn: Any, index: int) -> dict:
    if not isinstance(turn, dict):
        raise BadExample("malformed", f"turn {index} is {type(turn).__name__}, expected an object")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role is None or content is None:
        raise BadExample("malformed", f"turn {index} needs role/content (or from/value) keys, has {sorted(turn)}")
    if not isinstance(content, str):
        raise BadExample("malformed", f"turn {index} content is {type(content).__name__}, expected a string")
    if str(role).lower() not in ROLE_ALIASES:
        raise BadExample("unknown_role", f"turn {index} has role {role!r}: use one of "
                                         f"{', '.join(sorted(ROLE_ALIASES))}")
    return {"role": ROLE_ALIASES[str(role).lower()], "content": content}


def parse_conversation(record: Any) -> list[dict]:
    """OpenAI-style messages [{"role", "content"}] from any supported record shape; raises BadExample."""
    if not isinstance(record, dict):
        raise BadExample("malformed", f"record is {type(record).__name__}, expected an object")
    turns = record.get("messages", record.get("conversations"))
    if turns is not None:
        if not isinstance(turns, list):
            raise BadExample("malformed", "'messages'/'conversations' must be a list of turns")
        messages = [_message(t, i) for i, t in enumerate(turns)]
    else:
        prompt = record.get("instruction", record.get("prompt", record.get("question")))
        answer = record.get("output", record.get("response", record.get("completion", record.get("answer"))))
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise BadExample("malformed", "record has none of 'messages', 'conversations', or "
                                          "'instruction'/'prompt' + 'output'/'response' string fields")
        if isinstance(record.get("input"), str) and record["input"].strip():
            prompt = f"{prompt}\n\n{record['input']}"  # Alpaca: the instruction's input follows it
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    check_conversation(messages)
    return messages


def check_conversation(messages: list[dict]) -> None:
    if not messages:
        raise BadExample("empty", "conversation has no turns")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadExample("no_assistant", "conversation has no assistant turn, so nothing to learn from")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
        raise BadExample("empty_turn", "an assistant turn is empty")


# ---------------------------------------------------------------- ChatML
def assistant_spans(messages: Sequence[dict]) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant content plus its <|im_end|> in render_chatml's text."""
    spans, pos = [], 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        start = pos + len(head)
        end = start + len(m["content"]) + len(IM_END)
        if m["role"] == "assistant":
            spans.append((start, end))
        pos = end + 1  # the newline after <|im_end|>
    return spans


@dataclass
class Example:
    """One tokenized conversation: ids and labels (IGNORE_INDEX outside the loss), equal length."""
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_text_with_spans(tokenizer: Tokenizer, text: str,
                             spans: Sequence[tuple[int, int]]) -> Example:
    """Tokenize the whole text once; a token is trained when it starts inside a span.

    Tokenizing the whole text (not piece by piece) keeps BPE merges across piece boundaries identical to what
    apply_chat_template and inference see.
    """
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    starts = [s for s, _ in spans]
    labels = []
    for tok, (start, _end) in zip(enc.ids, enc.offsets):
        i = bisect.bisect_right(starts, start) - 1
        inside = i >= 0 and start < spans[i][1]
        labels.append(tok if inside else IGNORE_INDEX)
    return Example(list(enc.ids), labels)


def tokenize_conversation(tokenizer: Tokenizer, messages: Sequence[dict]) -> Example:
    """ChatML ids of a conversation, with labels on assistant content and <|im_end|> only."""
    if not tokenizer.has_chatml:
        raise ValueError("tokenizer has no <|im_start|>/<|im_end|> tokens: call add_chatml_tokens(model, tokenizer)")
    return tokenize_text_with_spans(tokenizer, render_chatml(messages), assistant_spans(messages))


# ---------------------------------------------------------------- data report
@dataclass
class DataReport:
    """What happened to every record: kept, or skipped for a named reason (with a few examples)."""
    kept: int = 0
    truncated: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, where: str, message: str) -> None:
        self.problems[kind] += 1
        self.examples.setdefault(kind, [])
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(f"{where}: {message}")

    @property
    def skipped(self) -> int:
        return sum(self.problems.values())

    def summary(self) -> str:
        text = f"kept {self.kept} records"
        if self.truncated:
            text += f" ({self.truncated} truncated)"
        if self.problems:
            parts = [f"{kind} {n} (e.g. {self.examples[kind][0]})" for kind, n in self.problems.most_common()]
            text += f", skipped {self.skipped}: " + "; ".join(parts)
        return text

    def to_dict(self) -> dict:
        return {"kept": self.kept, "truncated": self.truncated, "skipped": dict(self.problems),
                "examples": self.examples}


def check_policies(on_bad: str, too_long: str) -> None:
    if on_bad not in BAD_DATA_POLICIES:
        raise ValueError(f"on_bad must be one of {BAD_DATA_POLICIES}, got {on_bad!r}")
    if too_long not in TOO_LONG_POLICIES:
        raise ValueError(f"too_long must be one of {TOO_LONG_POLICIES}, got {too_long!r}")


def handle_bad(report: DataReport, error: BadExample, where: str, on_bad: str) -> None:
    """Count a bad record, or stop with a one-line message when the policy says so."""
    if on_bad == "error":
        raise ValueError(f"{where}: {error} (pass --on-bad skip to skip such records and count them)")
    report.add(error.kind, where, str(error))


def build_examples(records: Iterable[Any], make, cut, max_length: int, on_bad: str, too_long: str,
                   source: str) -> tuple[list, DataReport]:
    """make(record) -> an example (BadExample when the record is unusable); one over max_length tokens is skipped,
    fatal, or cut(example) to max_length (BadExample when nothing trained is left), as too_long says."""
    check_policies(on_bad, too_long)
    examples, report = [], DataReport()
    for i, record in enumerate(records, 1):
        where = f"{source} {i}"
        try:
            if isinstance(record, BadExample):  # a line read_records could not parse
                raise record
            example = make(record)
            if len(example) > max_length:
                if too_long == "error":
                    raise ValueError(f"{where} has {len(example)} tokens, more than max_length {max_length}: "
                                     "raise --max-length or pass --too-long skip|truncate")
                if too_long == "skip":
                    raise BadExample("too_long", f"{len(example)} tokens > max_length {max_length}")
                example = cut(example)
                report.truncated += 1
        except BadExample as e:
            handle_bad(report, e, where, on_bad)
            continue
        examples.append(example)
        report.kept += 1
    return examples, report


def build_sft_examples(records: Iterable[Any], tokenizer: Tokenizer, max_length: int, on_bad: str = "skip",
                       too_long: str = "skip", source: str = "record") -> tuple[list[Example], DataReport]:
    """Parse, render and tokenize conversations; bad or over-long records are counted, skipped or fatal."""
    def cut(example: Example) -> Example:
        example = Example(example.input_ids[:max_length], example.labels[:max_length])
        if example.num_trained == 0:
            raise BadExample("too_long", f"no assistant token left within max_length {max_length}")
        return example

    return build_examples(records, lambda record: tokenize_conversation(tokenizer, parse_conversation(record)), cut,
                          max_length, on_bad, too_long, source)


# ---------------------------------------------------------------- batches
def pack_examples(examples: Sequence[Example], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most max_length tokens (best fit, longest first).

    Returns lists of indices; rows keep the examples' order inside them.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        n = len(examples[i])
        if n > max_length:
            raise ValueError(f"example of {n} tokens does not fit max_length {max_length}: filter it first")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, row = free.pop(j)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return [sorted(r) for r in rows]


def collate_packed(examples: Sequence[Example], rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows -> input_ids, labels, segment_ids (attention stays inside a conversation) and position_ids
    (restarting at 0 for each conversation, as at inference). Rows are right-padded to the longest one."""
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)  # padding is a segment of its own
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for seg, i in enumerate(row):
            ex, n = examples[i], len(examples[i])
            input_ids[r, pos:pos + n] = torch.tensor(ex.input_ids)
            labels[r, pos:pos + n] = torch.tensor(ex.labels)
            segment_ids[r, pos:pos + n] = seg
            position_ids[r, pos:pos + n] = torch.arange(n)
            pos += n
    return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "position_ids": position_ids}


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One conversation per row, right-padded, with an attention mask."""
    width = max(len(ex) for ex in examples)
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for r, ex in enumerate(examples):
        n = len(ex)
        input_ids[r, :n] = torch.tensor(ex.input_ids)
        labels[r, :n] = torch.tensor(ex.labels)
        attention_mask[r, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ---------------------------------------------------------------- ChatML tokens in the embedding
@torch.no_grad()
def add_chatml_tokens(model, tokenizer: Tokenizer, multiple_of: int = 64,
                      for_adapter: bool = False) -> tuple[int, int]:
    """Add <|im_start|>/<|im_end|> and the chat template; give the model rows for them.

    The new ids take the first unused padding rows of the embedding and lm_head (phi: 51200 rows for 50295
    tokens, so no resize); when there is no room, both grow to a multiple of `multiple_of` rows. New rows start at
    the mean of the real rows, a neutral point the fine-tuning moves from. for_adapter (LoRA) keeps the lm_head
    bias of reused padding rows: a peft adapter carries the new rows' weights but no bias, so only the base's own
    bias gives the same logits where the adapter is loaded onto the untouched base (transformers + peft).
    Returns (im_start_id, im_end_id).
    """
    before = len(tokenizer)
    im_start, im_end = tokenizer.add_chatml()
    after = len(tokenizer)
    rows = model.config.vocab_size
    if after > rows:
        model.resize_token_embeddings(-(-after // multiple_of) * multiple_of)
    if after > before:
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings()
        embed[before:after] = embed[:before].mean(0, keepdim=True)
        head.weight[before:after] = head.weight[:before].mean(0, keepdim=True)
        if not for_adapter:
            head.bias[before:after] = head.bias[:before].mean()
    model.config.tokenizer_vocab_size = after if after < model.config.vocab_size else None
    return im_start, im_end

