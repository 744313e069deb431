"""`phikit info MODEL`: layout, config and parameter count of a checkpoint."""
from __future__ import annotations

import argparse
import json


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory or HF repo id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.epilog = "example:\n  phikit info ./phi-1_5"


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import describe
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    rows = [("path", info["path"]), ("layout", info["layout"]), ("dtype", info["dtype"]),
            ("parameters", f"{info['parameters']:,}"), ("tokenizer", info["tokenizer"])]
    rows += [(k, v) for k, v in cfg.items() if k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "partial_rotary_factor",
        "rope_theta", "max_position_embeddings", "vocab_size", "layer_norm_eps")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
