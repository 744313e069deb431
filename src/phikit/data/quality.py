"""The educational-value classifier of phi-1 and FineWeb-Edu: annotate a sample, learn, score everything.

1. Annotations (0-5, additive rubric) for a sample: from a teacher model (the FineWeb-Edu style prompt below),
   from a file (JSONL with `score` and `id` or `text`), or from `code_rubric`, a transparent rule-based version of
   the same additive rubric for Python source, for when no teacher is at hand.
2. Features: a phi model's hidden states (last layer, mean-pooled over the document's first tokens).
3. A scikit-learn head regressing the 0-5 score: a random forest (phi-1's choice of model) or a linear (ridge)
   head; held-out F1 of "score >= threshold" is measured on annotations kept out of training.
4. Every document gets `edu_score`; `filter` keeps those at or above the threshold.
"""
from __future__ import annotations

import ast
import asyncio
import hashlib
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from datatrove.pipeline.base import PipelineStep

from phikit.files import staged_file, write_json, write_text_atomic
from phikit.progress import tqdm

RUBRIC = """Below is an extract from a document. Evaluate whether it has high educational value and could be useful
in an educational setting for teaching, using the additive 5-point scoring system described below. Points are
accumulated based on the satisfaction of each criterion:

- Add 1 point if the extract provides some basic information relevant to educational topics, even if it includes
  some irrelevant or non-academic content like advertisements and promotional material.
- Add another point if the extract addresses certain elements pertinent to education but does not align closely
  with educational standards. It might mix educational content with non-educational material.
- Award a third point if the extract is appropriate for educational use and introduces key concepts relevant to
  school curricula. It is coherent though it may not be comprehensive.
- Grant a fourth point if the extract is highly relevant and beneficial for educational purposes, with a clear
  and consistent writing style. It is similar to a chapter from a textbook or a tutorial.
- Bestow a fifth point if the extract is outstanding in its educational value, perfectly suited for teaching. It
  follows detailed reasoning, the writing style is easy to follow and offers profound and thorough insights.

The extract:
{text}

After examining the extract, briefly justify your total score in up to 100 words, then conclude with the score
using the format: "Educational score: <total points>"."""

# One digit 0-5 and no more digits: "Educational score: 10" is out of range, not a 1.
_SCORE = re.compile(r"educational score:\s*([0-5])(?![\d])", re.IGNORECASE)


def parse_score(reply: str) -> int | None:
    m = _SCORE.findall(reply)
    return int(m[-1]) if m else None


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16]


# --- annotations ---------------------------------------------------------------------------------------------

def code_rubric(source: str) -> int:
    """An additive 0-5 rubric for Python source, by rules (used where no teacher model is available):
    +1 module docstring; +1 most functions/classes documented; +1 comment/docstring lines >= 15% of lines;
    +1 short functions (mean <= 30 lines); +1 worked examples (doctests). Unparsable code scores 0."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return 0
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    funcs = [n for n in defs if not isinstance(n, ast.ClassDef)]
    lines = [ln.strip() for ln in source.splitlines() if ln.strip()]
    doc_lines = sum(len((ast.get_docstring(n, clean=False) or "").splitlines()) for n in [tree, *defs])
    comment_lines = sum(ln.startswith("#") for ln in lines)
    score = 0
    score += ast.get_docstring(tree) is not None
    score += bool(defs) and sum(ast.get_docstring(n) is not None for n in defs) >= 0.5 * len(defs)
    score += bool(lines) and (doc_lines + comment_lines) >= 0.15 * len(lines)
    score += bool(funcs) and np.mean([n.end_lineno - n.lineno + 1 for n in funcs]) <= 30
    score += ">>>" in source
    return int(score)


def load_annotations(path: str | Path) -> dict[str, int]:
    """{id or text_id(text): score} from a JSONL of {"score": 0-5, "id": ...} or {"score": ..., "text": ...}."""
    from .io import read_records

    out: dict[str, int] = {}
    for rec in read_records([path], text_field=None):
        if "score" not in rec or not ("id" in rec or "text" in rec):
            raise ValueError(f"{path}: each annotation needs 'score' and 'id' or 'text'")
        score = int(rec["score"])
        if not 0 <= score <= 5:
            raise ValueError(f"{path}: score {score} is outside 0-5")
        out[str(rec["id"]) if "id" in rec else text_id(rec["text"])] = score
    return out


async def _teacher_annotate(texts: Sequence[str], teacher, concurrency: int, max_chars: int) -> list[int | None]:
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(0)
    bar = tqdm(total=len(texts), desc="annotate", unit="doc")

    from .synth import TeacherError, TeacherRefused

    async def one(client, text: str) -> int | None:
        async with sem:
            try:
                res = await teacher.complete(client, [{"role": "user",
                                                       "content": RUBRIC.format(text=text[:max_chars])}], rng)
            except TeacherRefused:
                raise
            except TeacherError as e:  # one document out of retries must not throw away every other annotation
                print(f"warning: a document was not annotated ({e})", file=sys.stderr)
                return None
            finally:
                bar.update()
            return parse_score(res["text"])

    async with teacher.client(concurrency) as client:
        scores = await asyncio.gather(*(one(client, t) for t in texts))
    bar.close()
    return list(scores)


def annotate_with_teacher(texts: Sequence[str], teacher, concurrency: int = 8, max_chars: int = 6000) -> list[int | None]:
    """Rubric scores from a teacher (synth.Teacher); None where the reply had no 'Educational score: N'."""
    return asyncio.run(_teacher_annotate(texts, teacher, concurrency, max_chars))


# --- features and head ---------------------------------------------------------------------------------------

def embed(texts: Sequence[str], model, tokenizer, max_tokens: int = 512, batch_size: int = 8,
          progress: bool = True) -> np.ndarray:
    """Mean-pooled last-layer hidden states of the first max_tokens tokens of each text: [N, hidden]."""
    import torch

    model.eval()
    out = []
    vocab_limit = model.config.vocab_size
    for i in tqdm(range(0, len(texts), batch_size), desc="embed", unit="batch", disable=not progress):
        # A token is rarely more than 8 characters: cut long texts first instead of tokenizing them whole.
        ids = [tokenizer.encode(t[:max_tokens * 8])[:max_tokens] or [tokenizer.eos_token_id]
               for t in texts[i:i + batch_size]]
        if max(max(x) for x in ids) >= vocab_limit:
            raise ValueError(f"the tokenizer makes ids up to {max(max(x) for x in ids)} but the model has "
                             f"{vocab_limit} rows: use the model's own tokenizer")
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        with torch.no_grad():
            # logits_to_keep=1: the hidden states are what we want, not logits over the whole vocabulary.
            hidden = model(input_ids, attention_mask=mask, output_hidden_states=True,
                           logits_to_keep=1).hidden_states[-1]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * m).sum(1) / m.sum(1)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)


@dataclass
class QualityHead:
    """A fitted head: predicts a 0-5 score from features."""
    kind: str
    estimator: Any

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.clip(self.estimator.predict(features), 0, 5)


def fit_head(features: np.ndarray, scores: np.ndarray, head: str = "rf", threshold: float = 3.0,
             test_fraction: float = 0.2, seed: int = 0) -> tuple[QualityHead, dict[str, Any]]:
    """Fit on (1 - test_fraction) of the annotations, report held-out metrics, then refit on all of them."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.linear_model import Ridge
    from sklearn.metrics import f1_score, mean_absolute_error
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if head not in ("rf", "linear"):
        raise ValueError(f"head must be 'rf' or 'linear', got {head!r}")
    scores = np.asarray(scores)
    if len(scores) < 10:
        raise ValueError(f"only {len(scores)} annotations: annotate at least 10 documents (--sample)")

    def make():
        if head == "rf":
            return RandomForestRegressor(n_estimators=100, min_samples_leaf=2, random_state=seed, n_jobs=1)
        return make_pipeline(StandardScaler(), Ridge(alpha=10.0))

    labels = scores >= threshold
    strat = labels if min(labels.sum(), (~labels).sum()) >= 2 else None
    x_tr, x_te, y_tr, y_te = train_test_split(features, scores, test_size=test_fraction, random_state=seed,
                                              stratify=strat)
    trial = QualityHead(head, make().fit(x_tr, y_tr))
    pred = trial.predict(x_te)
    metrics = {
        "head": head, "threshold": threshold, "annotations": int(len(scores)), "train": int(len(y_tr)),
        "heldout": int(len(y_te)),
        # As FineWeb-Edu: the regressed score is rounded to the nearest integer before the threshold.
        "heldout_f1": round(float(f1_score(y_te >= threshold, round_half_up(pred) >= threshold, zero_division=0)), 4),
        "heldout_mae": round(float(mean_absolute_error(y_te, pred)), 4),
        "heldout_positive_rate": round(float(np.mean(y_te >= threshold)), 4),
        "annotation_histogram": {int(k): int(v) for k, v in zip(*np.unique(scores, return_counts=True))},
    }
    return QualityHead(head, make().fit(features, scores)), metrics


def round_half_up(scores: np.ndarray) -> np.ndarray:
    """Nearest integer, halves up: 2.5 rounds to 3, so "rounds to 3 or more" is exactly what `filter --threshold
    2.5` keeps (np.rint rounds halves to even, and would leave a document scored 2.5 out of one and in the other)."""
    return np.floor(np.asarray(scores) + 0.5)


def plot_histogram(scores: np.ndarray, threshold: float, path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores, bins=np.linspace(0, 5, 26), color="#4c72b0")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_xlabel("predicted educational score")
    ax.set_ylabel("documents")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with staged_file(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_report(report_dir: str | Path, metrics: dict[str, Any], scores: np.ndarray, threshold: float,
                 title: str = "educational-value scores") -> dict[str, Any]:
    """report.json, report.md and score_histogram.png in report_dir."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    kept = int(np.sum(scores >= threshold))
    # heldout_f1 judges the rounded score (FineWeb-Edu), i.e. `filter --threshold T-0.5`; say how many that keeps
    # too, or F1 would describe a different set of documents than kept_at_threshold (`filter --threshold T`).
    kept_rounded = int(np.sum(round_half_up(scores) >= threshold))
    report = {**metrics, "documents": int(len(scores)), "kept_at_threshold": kept, "kept_when_rounded": kept_rounded,
              "score_mean": round(float(np.mean(scores)), 4) if len(scores) else None,
              "histogram_png": "score_histogram.png"}
    plot_histogram(scores, threshold, report_dir / "score_histogram.png", title)
    write_json(report_dir / "report.json", report)
    md = [f"# {title}", "", "| | |", "|---|---|"]
    for key in ("annotations", "annotator", "head", "heldout", "heldout_f1", "heldout_mae", "documents",
                "kept_at_threshold", "kept_when_rounded", "threshold"):
        if key in report:
            md.append(f"| {key} | {report[key]} |")
    md += ["", "![score histogram](score_histogram.png)", ""]
    write_text_atomic(report_dir / "report.md", "\n".join(md))
    return report


def load_embedding_model(name_or_path: str):
    """(model, tokenizer) from a checkpoint directory, or a randomly initialized preset with the phi tokenizer
    (random features: fine for a demonstration, a trained model gives better ones)."""
    from phikit.config import PRESETS, get_config
    from phikit.model import build_model
    from phikit.tokenizer import build_phi_tokenizer

    if name_or_path in PRESETS and not Path(name_or_path).exists():
        print(f"note: embedding with a randomly initialized {name_or_path!r} model; pass a trained checkpoint "
              f"directory for better features", file=sys.stderr)
        tok = build_phi_tokenizer()
        config = get_config(name_or_path, vocab_size=max(51200, len(tok)), tokenizer_vocab_size=len(tok))
        return build_model(config, seed=0), tok
    import phikit

    return phikit.load(name_or_path)


# --- filter, as datatrove tasks ----------------------------------------------------------------------------------

class FilterStage(PipelineStep):
    """Each task: the documents of its shard whose score is at or above the threshold, into a part file."""
    name = "filter"
    type = "Filter"

    def __init__(self, inputs: Sequence[str], work: str, text_field: str, on_error: str, threshold: float,
                 score_field: str = "edu_score") -> None:
        super().__init__()
        self.inputs, self.work, self.text_field, self.on_error = list(inputs), work, text_field, on_error
        self.threshold, self.score_field = threshold, score_field

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from .io import DataError, ReadStats, RecordWriter, read_records
        from .job import task_file, write_json

        folder, stats, seen, kept = Path(self.work), ReadStats(), 0, 0
        with RecordWriter(task_file(folder, "part", rank, ".jsonl")) as w:
            for rec in read_records(self.inputs, self.text_field, self.on_error, stats,
                                    shard=(rank, world_size), quiet=True):
                seen += 1
                if self.score_field not in rec:
                    raise DataError(f"{stats.where}: no {self.score_field!r} field: run `phikit data score` first, "
                                    "or name the score with --score-field")
                try:
                    score = float(rec[self.score_field])
                except (TypeError, ValueError):
                    raise DataError(f"{stats.where}: {self.score_field}={rec[self.score_field]!r} is not a number: "
                                    "rerun `phikit data score`, or name the score with --score-field") from None
                if score >= self.threshold:
                    w.write(rec)
                    kept += 1
        write_json(task_file(folder, "filter", rank), {"input": seen, "kept": kept, "threshold": self.threshold,
                                                       "skipped": stats.skipped})
        return iter(())


def summarize_filter(manifests: list[dict], folder: Path) -> dict[str, Any]:
    return {"input": sum(m["input"] for m in manifests), "kept": sum(m["kept"] for m in manifests),
            "threshold": manifests[0]["threshold"]}


def filter_stages(inputs: Sequence[str | Path], output: str | Path, work: Path, tasks: int, threshold: float,
                  text_field: str = "text", on_error: str = "fail", score_field: str = "edu_score") -> list:
    from .job import ConcatStage, Stage

    step = FilterStage([str(p) for p in inputs], str(work), text_field, on_error, threshold, score_field)
    return [Stage("filter", step, tasks),
            Stage("merge", ConcatStage("filter", str(work), "filter", tasks, str(output), summarize_filter), 1)]


# --- score, as datatrove tasks ---------------------------------------------------------------------------------
# The command fits the head on the annotated sample (in one process, as before) and saves it in the work folder;
# each task embeds its shard's documents in batches and scores them. A batch is 8 documents at positions
# 8k..8k+7 of the whole input (each task is told where its shard starts), so every document is embedded beside
# the same others whatever the number of tasks, and the scores do not change with it.

_models: dict[str, Any] = {}


def cached_embedding_model(name_or_path: str):
    """load_embedding_model, once per process (local workers forked from the command reuse its copy)."""
    if name_or_path not in _models:
        _models.clear()
        _models[name_or_path] = load_embedding_model(name_or_path)
    return _models[name_or_path]


class ScoreStage(PipelineStep):
    name = "score"
    type = "Annotator"

    def __init__(self, inputs: Sequence[str], work: str, text_field: str, on_error: str, model: str,
                 max_tokens: int, offsets: list[int], batch_size: int = 8) -> None:
        super().__init__()
        self.inputs, self.work, self.text_field, self.on_error = list(inputs), work, text_field, on_error
        self.model, self.max_tokens, self.offsets, self.batch_size = model, max_tokens, offsets, batch_size

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import pickle

        from .io import ReadStats, RecordWriter, read_records
        from .job import task_file, write_json

        folder, stats = Path(self.work), ReadStats()
        with open(folder / "head.pkl", "rb") as f:
            head = pickle.load(f)  # our own file: the head this job's command fitted
        model, tok = cached_embedding_model(self.model)
        position, scores, batch = self.offsets[rank], [], []
        with RecordWriter(task_file(folder, "part", rank, ".jsonl")) as w:
            def flush() -> None:
                features = embed([r[self.text_field] for r in batch], model, tok, self.max_tokens,
                                 batch_size=self.batch_size, progress=False)
                # rounded as written (4 decimals): what `filter` reads, and what the report counts
                for rec, s in zip(batch, head.predict(features)):
                    scores.append(round(float(s), 4))
                    w.write({**rec, "edu_score": scores[-1]})
                batch.clear()

            for rec in read_records(self.inputs, self.text_field, self.on_error, stats,
                                    shard=(rank, world_size), quiet=True):
                batch.append(rec)
                position += 1
                if position % self.batch_size == 0:
                    flush()
            if batch:
                flush()
        np.save(task_file(folder, "scores", rank, ".npy"), np.array(scores))
        write_json(task_file(folder, "score", rank), {"input": len(scores), "skipped": stats.skipped})
        return iter(())


class ScoreReportStage(PipelineStep):
    name = "score report"
    type = "Writer"

    def __init__(self, work: str, tasks: int, output: str, report_dir: str, metrics: dict, threshold: float) -> None:
        super().__init__()
        self.work, self.tasks, self.output, self.report_dir = work, tasks, output, report_dir
        self.metrics, self.threshold = metrics, threshold

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from .io import write_parts
        from .job import read_manifests, task_file

        folder = Path(self.work)
        manifests = read_manifests(folder, "score", self.tasks)
        write_parts(self.output, [task_file(folder, "part", r, ".jsonl") for r in range(self.tasks)])
        scores = np.concatenate([np.load(task_file(folder, "scores", r, ".npy")) for r in range(self.tasks)])
        skipped = [s for m in manifests for s in m["skipped"]]
        write_report(self.report_dir, {**self.metrics, "skipped_lines": len(skipped), "skipped": skipped}, scores,
                     self.threshold)
        return iter(())


def score_stages(inputs: Sequence[str | Path], output: str | Path, work: Path, tasks: int, head: QualityHead,
                 metrics: dict, model: str, report_dir: str | Path, threshold: float, offsets: list[int],
                 text_field: str = "text", on_error: str = "fail", max_tokens: int = 512) -> list:
    """The stages of a scoring job (run them with WorkFolder.run); saves the fitted head in the work folder."""
    import pickle

    from .job import Stage

    with staged_file(work / "head.pkl") as tmp:
        tmp.write_bytes(pickle.dumps(head))
    step = ScoreStage([str(p) for p in inputs], str(work), text_field, on_error, model, max_tokens, offsets)
    return [Stage("score", step, tasks, start_method="spawn"),
            Stage("report", ScoreReportStage(str(work), tasks, str(output), str(report_dir), metrics, threshold), 1)]
