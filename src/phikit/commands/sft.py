"""`phikit sft --model M --data FILE`: supervised fine-tuning on conversations in ChatML."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os


def add_finetune_arguments(p: argparse.ArgumentParser, defaults) -> None:
    """The arguments `phikit sft` and `phikit dpo` share: one per FineTuneConfig field (same name), with the
    defaults of `defaults`, an SFTConfig or DPOConfig."""
    p.add_argument("--model", required=True, help="base checkpoint directory or HF repo id")
    p.add_argument("--data", required=True, help=".jsonl, .json or .parquet file")
    p.add_argument("--val-data", help="held-out file for validation loss (default: --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    p.add_argument("--out", dest="out_dir", default=defaults.out_dir,
                   help=f"run directory (default {defaults.out_dir}); new, empty, or an earlier run's")
    longest = f", at most {defaults.longest_default}" if defaults.longest_default else ""
    p.add_argument("--max-length", type=int, default=defaults.max_length,
                   help=f"tokens per item (default: the model's context{longest})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=defaults.micro_batch_size,
                   help="per forward/backward; gradient accumulation makes up the batch")
    p.add_argument("--epochs", type=float, default=defaults.epochs)
    p.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=defaults.lr,
                   help=f"learning rate (default {defaults.default_lr():g}; ten times that with --lora)")
    p.add_argument("--schedule", choices=["constant", "cosine", "wsd"], default=defaults.schedule)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (q, k, v, dense, fc1, fc2) via peft")
    p.add_argument("--lora-r", type=int, default=defaults.lora_r)
    p.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout)
    p.add_argument("--no-merge", dest="merge", action="store_false",
                   help="with --lora, write only the adapter (not the merged model)")
    p.add_argument("--on-bad", choices=["skip", "error"], default=defaults.on_bad,
                   help="malformed items, unknown roles, missing assistant turn, identical pairs: count and skip, "
                        "or stop")
    p.add_argument("--too-long", choices=["skip", "truncate", "error"], default=defaults.too_long,
                   help="items longer than --max-length")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="steps between validations (0: at the end)")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps between checkpoints (0: at the end)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=defaults.precision)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=defaults.device)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")


def run_finetune(args: argparse.Namespace, config_cls, run_fn) -> int:
    """Build config_cls from the parsed arguments, run it, print the summary's plain values as one JSON line.
    Exit code as `phikit train`: 0 when completed, 130/143 when stopped by SIGINT/SIGTERM (checkpointed)."""
    from ..cli import CLIError
    from ..train.loop import TrainingDiverged

    fields = {f.name for f in dataclasses.fields(config_cls)}
    try:
        summary = run_fn(config_cls(**{k: v for k, v in vars(args).items() if k in fields}), resume=args.resume)
    except TrainingDiverged as e:  # a message with the remedies, not a traceback
        raise CLIError(str(e)) from e
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line, not one per process
        print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}))
    if summary["status"] != "completed":  # stopped early: no model was exported, --resume continues
        return 130 if "SIGINT" in summary["status"] else 143
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    from ..train.finetune_config import SFTConfig
    add_finetune_arguments(p, SFTConfig())
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="one conversation per row, padded (default: pack short ones; attention never crosses)")
    p.epilog = (
        "Data: one conversation per line, as {\"messages\": [{\"role\": ..., \"content\": ...}]} (OpenAI) or\n"
        "{\"conversations\": [{\"from\": \"human\"|\"gpt\"|\"system\", \"value\": ...}]} (ShareGPT/OpenHermes),\n"
        "or {\"instruction\", \"input\", \"output\"}. The loss covers assistant turns only.\n\n"
        "examples:\n"
        "  phikit sft --model microsoft/phi-1_5 --data openhermes.jsonl --out runs/sft --max-length 2048\n"
        "  phikit sft --model runs/base/model --data chats.jsonl --lora --lr 2e-4 --max-steps 500\n"
        "  phikit sft --model runs/base/model --data chats.jsonl --out runs/sft --resume")


def run(args: argparse.Namespace) -> int:
    from ..train.sft import SFTConfig, run_sft
    return run_finetune(args, SFTConfig, run_sft)
