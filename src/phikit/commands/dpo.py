"""`phikit dpo --model M --data FILE`: direct preference optimization on preference pairs in ChatML."""
from __future__ import annotations

import argparse

from .sft import add_finetune_arguments, run_finetune


def configure(p: argparse.ArgumentParser) -> None:
    from ..train.finetune_config import LOSS_TYPES, REFERENCE_MODES, DPOConfig
    defaults = DPOConfig()
    add_finetune_arguments(p, defaults)
    p.add_argument("--beta", type=float, default=defaults.beta, help="strength of the pull to the reference")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default=defaults.loss_type)
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing,
                   help="assumed share of flipped preferences (conservative DPO), in [0, 0.5)")
    p.add_argument("--reference", choices=REFERENCE_MODES, default=defaults.reference,
                   help="copy: frozen copy of the start model; precompute: reference log-probs computed once "
                        "(no second model in memory); adapter: the LoRA model with its adapter off "
                        "(default: adapter with --lora, else copy)")
    p.epilog = (
        "Data: one pair per line: {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...} with strings, or\n"
        "messages as in UltraFeedback-binarized (chosen/rejected hold the whole conversation).\n\n"
        "examples:\n"
        "  phikit dpo --model runs/sft/model --data ultrafeedback.jsonl --out runs/dpo --beta 0.1\n"
        "  phikit dpo --model runs/sft/model --data pairs.jsonl --lora --reference adapter --lr 5e-6\n"
        "  phikit dpo --model runs/sft/model --data pairs.jsonl --reference precompute --loss-type ipo")


def run(args: argparse.Namespace) -> int:
    from ..train.dpo import DPOConfig, run_dpo
    return run_finetune(args, DPOConfig, run_dpo)
