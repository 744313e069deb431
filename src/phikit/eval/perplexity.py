"""Perplexity and bits-per-byte of text files, with the harness's rolling-window convention: every document is
scored on its own, each token with as much preceding context as fits, the first after <|endoftext|>.

Files: .txt (one document per file, or per blank-line-separated paragraph with --split-paragraphs) or .jsonl
(one document per line in a `text` field).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .scoring import LogLikelihoodScorer, bits_per_byte, document_logprob


def read_documents(paths: list[str | Path], text_field: str = "text", split_paragraphs: bool = False) -> list[str]:
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"text file {p} does not exist: pass .txt or .jsonl files with --text-files")
        if p.suffix == ".jsonl":
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    row = json.loads(line)
                    if text_field not in row:
                        raise ValueError(f"{p} line {n + 1} has no {text_field!r} field: set --text-field")
                    docs.append(row[text_field])
        else:
            text = p.read_text(encoding="utf-8")
            docs += [t for t in text.split("\n\n") if t.strip()] if split_paragraphs else [text]
    docs = [d for d in docs if d.strip()]  # an empty document has no tokens to score
    if not docs:
        raise ValueError("no text found in the --text-files: they are empty")
    return docs


def evaluate_perplexity(model, tokenizer, documents: list[str], max_length: int | None = None) -> dict:
    scorer = LogLikelihoodScorer(model, max_length=max_length)
    tokens = tokenizer.encode_batch(documents)
    kept = [(d, t) for d, t in zip(documents, tokens) if t]
    if not kept:
        raise ValueError("no text to score: the documents are empty")
    logprobs = document_logprob(scorer, [t for _, t in kept], tokenizer.eos_token_id, progress=True)
    records = []
    for (doc, toks), lp in zip(kept, logprobs):
        records.append({"tokens": len(toks), "bytes": len(doc.encode("utf-8")), "words": len(doc.split()),
                        "logprob": lp, "perplexity": math.exp(-lp / len(toks))})
    total_lp = sum(r["logprob"] for r in records)
    n_tok, n_bytes, n_words = (sum(r[k] for r in records) for k in ("tokens", "bytes", "words"))
    metrics = {"perplexity": math.exp(-total_lp / n_tok), "bits_per_byte": bits_per_byte(total_lp, n_bytes),
               "byte_perplexity": math.exp(-total_lp / n_bytes), "word_perplexity": math.exp(-total_lp / max(1, n_words))}
    return {"metrics": metrics, "n": len(records), "records": records}
