"""`phikit train --config configs/NAME.yaml [key=value ...]`: pretrain a phi model."""
from __future__ import annotations

import argparse
import json


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config keys, e.g. lr=3e-4 max_steps=200 model_config.num_hidden_layers=4")
    p.add_argument("--config", "-c", help="YAML training config (see configs/)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest valid checkpoint in out_dir (skipping corrupt ones)")
    p.add_argument("--export", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"),
                   help="write a checkpoint (or a run directory's newest) as an HF-native model and exit")
    p.add_argument("--no-export", action="store_true", help="do not write RUN/model at the end of the run")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.epilog = (
        "examples:\n"
        "  phikit train --config configs/cpu-tiny.yaml data=shards/textbooks out_dir=runs/tiny\n"
        "  phikit train --config configs/cpu-tiny.yaml data=shards/textbooks out_dir=runs/tiny --resume\n"
        "  phikit train --config configs/cpu-tiny.yaml data=shards/textbooks optimizer=muon muon_lr=0.02\n"
        "  torchrun --nproc_per_node 8 -m phikit train --config configs/phi-1_5-paper.yaml data=mix.yaml\n"
        "  phikit train --export runs/tiny runs/tiny-hf"
    )


def run(args: argparse.Namespace) -> int:
    if args.export:
        from ..files import check_output
        from ..train.checkpointing import export_checkpoint

        check_output(args.export[1], "model", inputs=[args.export[0]])
        out = export_checkpoint(*args.export)
        print(f"exported {args.export[0]} to {out}")
        return 0
    if not args.config and not args.overrides:
        raise ValueError("nothing to train: pass --config configs/NAME.yaml (and key=value overrides)")
    from ..train.config import load_config

    cfg = load_config(args.config, args.overrides, validate=not args.print_config)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from ..cli import CLIError
    from ..train.loop import TrainingDiverged
    from ..train.pretrain import run_pretraining

    try:
        summary = run_pretraining(cfg, resume=args.resume, export=not args.no_export)
    except TrainingDiverged as e:
        raise CLIError(str(e)) from e
    if summary["status"] != "completed":
        return 130 if "SIGINT" in summary["status"] else 143
    return 0
