"""Synthetic textbook data from a teacher model behind any OpenAI-compatible chat-completions endpoint.

Prompts are the product of seed topics x audiences x styles (optionally each with a random extract of seed text,
for diversity, as in the phi-1.5 report). Requests run concurrently (asyncio + httpx) with retries and
exponential backoff on 429, 5xx, timeouts and dropped connections; a teacher never reached at all (a wrong
URL, a server that is down) and any other 4xx stop the run at once with one message. Results go to an
append-only JSONL that survives a crash: each answer is one fsynced line, a torn last line is cut on restart,
and a rerun asks only for the prompts that have no line yet, so every prompt ends up answered exactly once.
Answers that are too short go to `<output>.rejected.jsonl` (also counted as done, so they are not asked again).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx
from datatrove.pipeline.base import PipelineStep

from phikit.progress import tqdm

from .io import AppendLog

AUDIENCES = ["young children", "middle school students", "high school students", "college students",
             "curious adults"]

STYLES: dict[str, str] = {
    "textbook": "Write an extensive, clear textbook chapter section about {topic} for {audience}. Explain the key "
                "ideas step by step, with concrete examples.",
    "exercises": "Write 3 exercises about {topic} for {audience}, each followed by a complete step-by-step "
                 "solution that ends with 'Answer:' and the final answer.",
    "story": "Write a short story for {audience} in which the characters learn about {topic}. The story should "
             "teach something true and useful about it.",
    "qa": "Write a question-and-answer dialogue between a curious student and a teacher about {topic}, pitched "
          "at {audience}. Each answer should explain the reasoning.",
    "code": "Write a Python exercise related to {topic} for {audience}: one function with a clear docstring, its "
            "implementation, and assert-based tests that it passes. Output only the code.",
}

# Openings a chat model adds that are not textbook text ("Sure! Here is ...", "As an AI ...").
_OPENERS = r"(?:sure|certainly|of course|absolutely|okay|ok|great|here is|here's|below is)"
BOILERPLATE = re.compile(
    rf"^\s*(?:{_OPENERS}\b[!.,]?\s*(?:\n|$)"           # a bare "Certainly." line
    rf"|{_OPENERS}\b[^\n]{{0,160}}:\s*(?:\n|$)"        # "Sure! Here is a chapter about X:"
    r"|as an ai\b[^\n]*(?:\n|$))", re.IGNORECASE)      # "As an AI language model, ..."
CLOSING = re.compile(r"\n\s*(?:i hope this helps|let me know if|feel free to ask)[^\n]*\s*$", re.IGNORECASE)


def clean(text: str) -> str:
    """Strip boilerplate openings and closings, then surrounding whitespace."""
    text = text.strip()
    while True:
        m = BOILERPLATE.match(text)
        if not m:
            break
        text = text[m.end():].lstrip()
    return CLOSING.sub("", text).strip()


def load_topics(path: str | Path | None = None) -> list[str]:
    """Seed topics, one per line (blank lines and #-comments ignored); the built-in list when path is None."""
    path = Path(path) if path else Path(__file__).with_name("assets") / "topics.txt"
    if not path.exists():
        raise FileNotFoundError(f"topics file {path} does not exist: give one topic per line")
    topics = [t.strip() for t in path.read_text(encoding="utf-8").splitlines()]
    topics = [t for t in topics if t and not t.startswith("#")]
    if not topics:
        raise ValueError(f"topics file {path} is empty: give one topic per line")
    return topics


def build_prompts(topics: Sequence[str], audiences: Sequence[str] = AUDIENCES,
                  styles: Sequence[str] = tuple(STYLES), limit: int | None = None, seed: int = 0,
                  seed_texts: Sequence[str] = (), extract_words: int = 80) -> list[dict[str, Any]]:
    """The prompts (with a stable prompt_id each): all topic x audience x style combinations, or a seeded sample
    of `limit` of them; with seed_texts, each prompt also carries a random extract to draw inspiration from."""
    for s in styles:
        if s not in STYLES:
            raise ValueError(f"unknown style {s!r}: choose from {', '.join(STYLES)}")
    # A topic listed twice would give two prompts with one prompt_id, both answered: a duplicated record.
    topics, audiences, styles = (list(dict.fromkeys(x)) for x in (topics, audiences, styles))
    combos = [(t, a, s) for t in topics for a in audiences for s in styles]
    rng = random.Random(seed)
    if limit is not None and limit < len(combos):
        combos = rng.sample(combos, limit)
    seed_words = [t.split() for t in seed_texts if t.split()]
    prompts = []
    for topic, audience, style in combos:
        content = STYLES[style].format(topic=topic, audience=audience)
        extract = None
        if seed_words:
            w = rng.choice(seed_words)
            start = rng.randrange(max(1, len(w) - extract_words))
            extract = " ".join(w[start:start + extract_words])
            content += f"\n\nFor inspiration, here is an unrelated extract; you may borrow ideas from it:\n{extract}"
        pid = hashlib.sha256(f"{topic}\x00{audience}\x00{style}\x00{extract}".encode()).hexdigest()[:16]
        prompts.append({"prompt_id": pid, "topic": topic, "audience": audience, "style": style,
                        "prompt": content, **({"extract": extract} if extract else {})})
    return prompts


class TeacherError(ValueError):
    """The teacher could not answer, even after retries: a rerun may succeed."""


class TeacherRefused(TeacherError):
    """The teacher rejected the request itself (a 4xx other than 429): retrying cannot help."""


class TeacherUnreachable(TeacherRefused):
    """No connection to the teacher before any answer: a wrong --base-url or a server that is not running."""


@dataclass
class Teacher:
    """An OpenAI-compatible chat-completions endpoint with retries: 429/5xx/timeouts/connection errors are
    retried with exponential backoff and jitter (honouring Retry-After); other 4xx stop the run."""
    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    max_retries: int = 8
    backoff: float = 0.5
    max_backoff: float = 30.0
    temperature: float = 0.7
    max_tokens: int = 1024
    transport: httpx.AsyncBaseTransport | None = field(default=None, repr=False)  # e.g. httpx.MockTransport
    reached: bool = field(default=False, repr=False)  # set by the first HTTP response of any kind

    def client(self, concurrency: int) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        return httpx.AsyncClient(base_url=self.base_url.rstrip("/") + "/", headers=headers, limits=limits,
                                 timeout=httpx.Timeout(self.timeout), transport=self.transport)

    async def complete(self, client: httpx.AsyncClient, messages: list[dict], rng: random.Random,
                       **extra: Any) -> dict[str, Any]:
        """{'text', 'usage', 'finish_reason'} of one chat completion, after retries; raises TeacherError."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, **extra}
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                r = await client.post("chat/completions", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                # Never reached: retrying every prompt with backoff would take hours to say the URL is wrong.
                if not self.reached:
                    raise TeacherUnreachable(f"cannot reach the teacher at {self.base_url} ({type(e).__name__}: "
                                             f"{e}): check --base-url and that the server is running") from None
                last = f"{type(e).__name__}: {e}"
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                self.reached = True
                if r.status_code == 200:
                    try:
                        return _parse_completion(r)
                    except (KeyError, IndexError, TypeError, ValueError) as e:
                        last = f"malformed response ({type(e).__name__}: {e}): {r.text[:200]}"
                else:
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                    if r.status_code != 429 and r.status_code < 500:  # the request itself is wrong
                        raise TeacherRefused(f"the teacher refused the request ({last}): check --model, "
                                             f"--base-url and the API key")
                    if r.headers.get("retry-after", "").replace(".", "", 1).isdigit():
                        wait = float(r.headers["retry-after"])
            if attempt < self.max_retries:
                if wait is not None:  # the server said how long: jitter only upwards, never sooner
                    await asyncio.sleep(wait * (1 + 0.25 * rng.random()))
                else:
                    await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + rng.random()))
        raise TeacherError(f"gave up after {self.max_retries + 1} attempts: {last}")


def _parse_completion(r: httpx.Response) -> dict[str, Any]:
    """{'text', 'usage', 'finish_reason'} of a 200 reply; raises on any other shape (then retried)."""
    data = r.json()
    choice = data["choices"][0]
    text = choice["message"]["content"] or ""
    if not isinstance(text, str):
        raise TypeError(f"message content is {type(text).__name__}, not a string")
    text.encode("utf-8")  # a lone surrogate ("\\ud800" in the JSON) is not text: UnicodeEncodeError, retried
    usage = data.get("usage")
    # Only the numeric counts: a garbage value ("n/a") must neither crash the token tally nor the log's write.
    usage = {k: v for k, v in usage.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} \
        if isinstance(usage, dict) else {}
    reason = choice.get("finish_reason")
    return {"text": text, "usage": usage, "finish_reason": reason if isinstance(reason, str) else None}


@dataclass
class SynthStats:
    prompts: int = 0
    already_done: int = 0
    written: int = 0
    rejected: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def rejected_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".rejected.jsonl")


def done_ids(output: str | Path) -> set[str]:
    """prompt_ids already answered (kept or rejected) in earlier runs."""
    ids: set[str] = set()
    for path in (Path(output), rejected_path(output)):
        if path.exists():
            with AppendLog(path) as log:  # opening repairs a torn last line
                ids.update(r["prompt_id"] for r in log.records())
    return ids


def _check_settings(output: str | Path, concurrency: int) -> None:
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if not str(output).endswith((".jsonl", ".ndjson")):  # the log is appended line by line: JSONL only
        raise ValueError(f"synth writes JSONL: name the output .jsonl, not {Path(output).name} (convert it "
                         f"afterwards, e.g. with `phikit data dedup ... --output x.parquet`)")


async def synthesize(prompts: list[dict[str, Any]], output: str | Path, teacher: Teacher, concurrency: int = 16,
                     min_words: int = 50, system: str | None = None, seed: int = 0,
                     progress: bool = True) -> SynthStats:
    """Answer every prompt not yet in `output`; see the module docstring for the guarantees."""
    _check_settings(output, concurrency)
    stats = SynthStats(prompts=len(prompts))
    done = done_ids(output)
    todo = [p for p in prompts if p["prompt_id"] not in done]
    stats.already_done = len(prompts) - len(todo)
    rng = random.Random(seed)
    queue: asyncio.Queue = asyncio.Queue()
    for p in todo:
        queue.put_nowait(p)
    bar = tqdm(total=len(todo), desc="synth", unit="prompt", disable=not progress)

    with AppendLog(output) as kept, AppendLog(rejected_path(output)) as rejected:
        async with teacher.client(concurrency) as client:
            async def worker() -> None:
                while not queue.empty():
                    p = queue.get_nowait()
                    messages = ([{"role": "system", "content": system}] if system else []) + \
                        [{"role": "user", "content": p["prompt"]}]
                    try:
                        res = await teacher.complete(client, messages, rng)
                    except TeacherRefused:
                        raise
                    except TeacherError as e:
                        stats.failed += 1
                        print(f"warning: prompt {p['prompt_id']} unanswered ({e}); a rerun will retry it",
                              file=sys.stderr)
                        bar.update()
                        continue
                    text = clean(res["text"])
                    usage = res["usage"]
                    stats.prompt_tokens += int(usage.get("prompt_tokens", 0) or 0)
                    stats.completion_tokens += int(usage.get("completion_tokens", 0) or 0)
                    record = {"text": text, "prompt_id": p["prompt_id"], "topic": p["topic"],
                              "audience": p["audience"], "style": p["style"], "teacher": teacher.model,
                              "usage": usage, "finish_reason": res["finish_reason"]}
                    if len(text.split()) < min_words:
                        rejected.append({**record, "reason": f"shorter than {min_words} words"})
                        stats.rejected += 1
                    else:
                        kept.append(record)  # one whole line, fsynced: a crash loses at most in-flight requests
                        stats.written += 1
                    bar.update()

            tasks = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(todo)) or 1)]
            try:
                await asyncio.gather(*tasks)
            finally:  # one worker stopped the run (a refusal): stop the others before the logs close
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    bar.close()
    return stats


def api_key_from_env(var: str) -> str | None:
    key = os.environ.get(var)
    if not key:
        print(f"note: ${var} is not set; sending requests without an API key", file=sys.stderr)
    return key or None


# --- the same, as datatrove tasks ------------------------------------------------------------------------------
# The prompts are cut into `tasks` contiguous pieces; each task answers its piece into its own append-only logs in
# OUTPUT.partial/ (so a task killed half-way resumes where it stopped, and tasks on a cluster never share a file).
# Every task runs with concurrency // workers requests in flight, so the whole job never has more than
# `concurrency` open at the teacher. A task that could not answer every prompt fails, so a rerun redoes it; when
# all are done, the last stage writes the output (answers already in an existing output first, then each
# task's, in prompt order of the tasks) and the report.

class PromptsUnanswered(ValueError):
    """Some prompts are still unanswered after retries: a rerun asks only for those."""


class SynthStage(PipelineStep):
    name = "synth"
    type = "Generator"

    def __init__(self, work: str, prompts: int, teacher: Teacher, concurrency: int, min_words: int,
                 system: str | None, seed: int, previous: list[str]) -> None:
        super().__init__()
        self.work, self.prompts, self.teacher, self.concurrency = work, prompts, teacher, concurrency
        self.min_words, self.system, self.seed, self.previous = min_words, system, seed, previous

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import json

        from .job import task_file, write_json

        folder = Path(self.work)
        lo, hi = self.prompts * rank // world_size, self.prompts * (rank + 1) // world_size
        with open(folder / "prompts.jsonl", encoding="utf-8") as f:
            mine = [json.loads(line) for i, line in enumerate(f) if lo <= i < hi]
        done = set(self.previous)
        mine = [p for p in mine if p["prompt_id"] not in done]
        log = task_file(folder, "answers", rank, ".jsonl")
        stats = asyncio.run(synthesize(mine, log, self.teacher, self.concurrency, self.min_words, self.system,
                                       self.seed + rank, progress=False))
        if stats.failed:
            raise PromptsUnanswered(f"{stats.failed} prompts are still unanswered: rerun the same command to "
                                    "complete them")
        write_json(task_file(folder, "synth", rank), {**vars(stats), "prompts": hi - lo})
        return iter(())


class SynthMergeStage(PipelineStep):
    name = "synth merge"
    type = "Writer"

    def __init__(self, work: str, tasks: int, output: str, already_done: int) -> None:
        super().__init__()
        self.work, self.tasks, self.output, self.already_done = work, tasks, output, already_done

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from .io import write_parts, write_report
        from .job import read_manifests

        folder, output = Path(self.work), Path(self.output)
        manifests = read_manifests(folder, "synth", self.tasks)
        for target, name in ((output, "answers-{:05d}.jsonl"), (rejected_path(output), "answers-{:05d}.jsonl"
                                                                  ".rejected.jsonl")):
            parts = [target] if target.exists() else []
            parts += [p for p in (folder / name.format(r) for r in range(self.tasks)) if p.exists()]
            write_parts(target, parts)
        totals = {k: sum(m[k] for m in manifests) for k in vars(SynthStats())}
        # already_done counts what earlier runs answered: in an existing output, or in logs of a killed run
        totals["already_done"] += self.already_done
        write_report(output, {"step": "synth", **totals})
        return iter(())


def synth_stages(prompts: list[dict[str, Any]], output: str | Path, work: Path, tasks: int, teacher: Teacher,
                 concurrency: int, running: int, min_words: int = 50, system: str | None = None,
                 seed: int = 0) -> list:
    """The stages of a synth job (run them with WorkFolder.run); writes the prompts into the work folder."""
    import json

    from phikit.files import write_text_atomic

    from .job import Stage

    _check_settings(output, concurrency)
    previous = sorted(done_ids(output)) if Path(output).exists() else []
    write_text_atomic(work / "prompts.jsonl", "".join(json.dumps(p) + "\n" for p in prompts))
    # One limit for the whole job: at most `running` tasks run at once, each with its share.
    per_task = max(1, concurrency // max(1, running))
    step = SynthStage(str(work), len(prompts), teacher, per_task, min_words, system, seed, previous)
    already = sum(1 for p in prompts if p["prompt_id"] in set(previous))
    return [Stage("answer", step, tasks), Stage("merge", SynthMergeStage(str(work), tasks, str(output), already), 1)]
