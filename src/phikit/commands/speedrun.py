"""`phikit speedrun`: from nothing to a phi model you can talk to, with a report."""
from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    from ..cli import choice_of
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget; pretraining and SFT steps are sized to fit it (default 10)")
    p.add_argument("--out", default="runs/speedrun", help="run directory (default runs/speedrun)")
    p.add_argument("--preset", default="cpu-tiny", type=choice_of("phikit.speedrun", "PRESETS"), metavar="NAME",
                   help="scale: micro (a one-minute smoke test), cpu-tiny (laptop CPU, default), gpu-small, "
                        "phi-1_5 (see docs/speedrun.md)")
    p.add_argument("--teacher-url", default=None,
                   help="OpenAI-compatible base URL of a teacher model that adds synthetic textbook passages "
                        "(key from $PHIKIT_TEACHER_API_KEY)")
    p.add_argument("--teacher-model", default="teacher", help="model name sent to the teacher")
    p.add_argument("--ablation", action="store_true",
                   help="also train on an unfiltered web-like mix with the same compute and compare")
    p.add_argument("--seed", type=int, default=0, help="data, held-out sample and initialization (default 0)")
    p.add_argument("--fresh", action="store_true", help="delete the run directory first instead of resuming")
    p.epilog = ("examples:\n  phikit speedrun                       # ~10 minutes on a laptop CPU\n"
                "  phikit speedrun --minutes 30 --ablation --out runs/long\n"
                "  phikit speedrun --teacher-url http://127.0.0.1:8000/v1\n\n"
                "A rerun of the same command skips the stages that finished (kill it at any time); adding --ablation\n"
                "runs only that stage. Other settings need --fresh or another --out.")


def run(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from ..speedrun import Speedrun
    from ..files import check_output
    out = Path(args.out)
    # --out . or --out ~ must not fill (or, with --fresh, delete) someone's work: only a speedrun's own directory
    # is resumed or started over.
    check_output(out, "speedrun", force=True)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    run = Speedrun(out=args.out, minutes=args.minutes, preset=args.preset, teacher_url=args.teacher_url,
                   teacher_model=args.teacher_model, ablation=args.ablation, seed=args.seed)
    results = run.run()
    report = results["report"]["report"]
    scores = results.get("eval", {}).get("scores", {})
    print(f"\nreport: {report}")
    for name, s in scores.items():
        print(f"  {name:<11} easy arithmetic {s.get('arithmetic_easy_accuracy', 0):.1%}  "
              f"arithmetic {s.get('arithmetic_accuracy', 0):.1%}  "
              f"word problems {s.get('word_problem_accuracy', 0):.1%} "
              f"(new phrasings {s.get('word_problem_new_phrasing_accuracy', 0):.1%})  "
              f"perplexity {s.get('heldout_perplexity', 0):.2f}")
    from ..speedrun_report import baseline_lines
    for line in baseline_lines(scores):
        print(line)
    print(f"\ntalk to it:   phikit chat --model {Path(args.out) / 'model-chat'}")
    print(f"serve it:     phikit serve --model {Path(args.out) / 'model-chat'} --port 8000")
    return 0
