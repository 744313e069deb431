"""Supervised fine-tuning on ChatML conversations, through the shared training loop (loop.Trainer).

    summary = run_sft(SFTConfig(model="runs/base/model", data="chats.jsonl", out_dir="runs/sft"))

The base model gets the ChatML tokens (in its padding rows when there is room), conversations are tokenized with
the loss on assistant turns only, short ones are packed into rows whose attention never crosses a conversation
(or padded, one per row), and the Trainer does the rest: AdamW, schedule, checkpoints, resume, metrics, report.
The result is RUN/model (phikit.save layout), or RUN/adapter (peft) and, by default, the merged RUN/model with LoRA.
"""
from __future__ import annotations

import dataclasses
import math
import random
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from ..files import check_output, write_json
from .chat_data import (Example, add_chatml_tokens, build_sft_examples, collate_packed, collate_padded,
                        pack_examples, read_records)
from .finetune_config import SFTConfig
from .losses import causal_lm_loss


# ---------------------------------------------------------------- batches (the loss: losses.causal_lm_loss)
class EpochBatches:
    """batch_fn(step, micro) for the Trainer over fixed rows: a pure function of (step, micro), so resume is exact.
    Each epoch visits the rows in a fresh order seeded by (seed, epoch); process `rank` of `world` takes every
    world-th micro-batch; collate turns the picked rows into a batch."""

    def __init__(self, rows: Sequence, collate, micro_batch_size: int, grad_accum: int, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.rows, self.collate, self.per_epoch = list(rows), collate, len(rows)
        self.micro, self.accum, self.seed, self.rank, self.world = micro_batch_size, grad_accum, seed, rank, world
        self._order: dict[int, list[int]] = {}

    def steps_per_epoch(self) -> float:
        return self.per_epoch / (self.micro * self.accum * self.world)

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        first = ((step * self.accum + micro) * self.world + self.rank) * self.micro
        picked = []
        for k in range(first, first + self.micro):
            epoch, offset = divmod(k, self.per_epoch)
            if epoch not in self._order:
                order = list(range(self.per_epoch))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
                self._order = {epoch: order}  # keep one epoch: memory stays flat on long runs
            picked.append(self.rows[self._order[epoch][offset]])
        return self.collate(picked)


def sft_batches(examples: Sequence[Example], micro_batch_size: int, grad_accum: int, max_length: int, pad_id: int,
                packing: bool = True, seed: int = 0, rank: int = 0, world: int = 1) -> EpochBatches:
    """Rows of packed groups of conversations (shuffled once by seed, then packed), or one conversation each."""
    if not examples:
        raise ValueError("no training conversations left after filtering: check the data report")
    if not packing:
        return EpochBatches(examples, partial(collate_padded, pad_id=pad_id), micro_batch_size, grad_accum, seed,
                            rank, world)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    return EpochBatches(pack_examples(shuffled, max_length), partial(collate_packed, shuffled, pad_id=pad_id),
                        micro_batch_size, grad_accum, seed, rank, world)


# ---------------------------------------------------------------- shared run plumbing (SFT and DPO)
def load_base(model_ref, tokenizer=None):
    """(model, tokenizer) from a checkpoint path / repo id, or the objects passed in."""
    if isinstance(model_ref, (str, Path)):
        if not str(model_ref):
            raise ValueError("no base model: pass --model DIR (a checkpoint directory or an HF repo id)")
        from ..checkpoint import load
        model, loaded_tok = load(model_ref)
        return model, tokenizer or loaded_tok
    if tokenizer is None:
        raise ValueError("pass the tokenizer together with an in-memory model")
    return model_ref, tokenizer


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list]:
    if not fraction:
        return items, []
    order = list(range(len(items)))
    random.Random(seed + 17).shuffle(order)
    n_val = max(1, int(len(items) * fraction))
    val = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def export_result(model, tokenizer, run_dir: Path, lora: bool, merge: bool) -> dict[str, str]:
    """RUN/model (phikit.save layout) for full fine-tuning; RUN/adapter (+ merged RUN/model) for LoRA."""
    from ..checkpoint import save
    from .distributed import unwrap
    from .lora import merge_adapter, save_adapter

    model = unwrap(model)
    out = {}
    if lora:
        out["adapter_dir"] = str(save_adapter(model, run_dir / "adapter"))
        if merge:
            import copy
            merged = merge_adapter(copy.deepcopy(model))
            out["model_dir"] = str(save(merged, tokenizer, run_dir / "model"))
    else:
        out["model_dir"] = str(save(model, tokenizer, run_dir / "model"))
    return out


def check_run_dir(run_dir: str | Path, resume: bool) -> None:
    """Refuse a run directory that holds another run's checkpoints unless resuming, before anything is loaded or
    written into it (its config, data report and tokenizer must not be replaced by a run that then stops)."""
    from .checkpointing import list_checkpoints
    check_output(run_dir, "run")  # a directory of the user's own files is not a run directory to write into
    if not resume and list_checkpoints(run_dir):
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another --out")


def prepare_policy(model, tokenizer, cfg):
    """ChatML tokens in the embedding; LoRA wrapping (new token rows trainable) when asked."""
    # peft draws lora_A's initial values, and dropout its masks, from torch's global generator, which every new
    # Python process seeds at random: without this, two runs with the same --seed train different adapters.
    torch.manual_seed(cfg.seed)
    context = model.config.max_position_embeddings
    if not cfg.max_length:
        cfg.max_length = min(context, cfg.longest_default or context)
    if cfg.max_length > context:  # packed rows reach max_length tokens: the first step would fail, minutes in
        raise ValueError(f"--max-length {cfg.max_length} exceeds the model's context of {context} tokens: "
                         f"pass --max-length {context} or less")
    before = len(tokenizer)
    add_chatml_tokens(model, tokenizer, for_adapter=cfg.lora)
    if cfg.lora:
        from .lora import apply_lora
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           train_token_ids=range(before, len(tokenizer)))
    return model


# ---------------------------------------------------------------- the run
def finetune(kind: str, cfg, model, tokenizer, resume: bool, export: bool, build_examples, setup) -> dict[str, Any]:
    """The run SFT and DPO share: checks, the base model with ChatML tokens (and LoRA), examples from cfg.data
    (build_examples: records -> (examples, DataReport)) and a held-out part, the Trainer, the export.
    setup(model, tokenizer, examples, val, grad_accum, env) gives (batches, loss_fn, eval_batches, entries for the
    data report, entries for the summary)."""
    from . import distributed
    from .config import TrainConfig
    from .loop import Trainer

    cfg.check()
    check_run_dir(cfg.out_dir, resume)
    model, tokenizer = load_base(model if model is not None else cfg.model, tokenizer)
    model = prepare_policy(model, tokenizer, cfg)

    def build(path):
        unit = "pair" if kind == "dpo" else "record"
        return build_examples(read_records(path), tokenizer, cfg.max_length, cfg.on_bad, cfg.too_long,
                              source=f"{Path(path).name} {unit}")

    examples, report = build(cfg.data)
    val_report = None
    if cfg.val_data:
        val, val_report = build(cfg.val_data)
    else:
        examples, val = split_validation(examples, cfg.val_fraction, cfg.seed)
    env = distributed.init_distributed(cfg.device)
    if env.is_main:
        print(f"{kind} data: {report.summary()}")
    grad_accum = cfg.batch_size // (cfg.micro_batch_size * env.world_size) or 1
    batches, loss_fn, eval_batches, counts, extra = setup(model, tokenizer, examples, val, grad_accum, env)
    extra = {"kind": kind, "skipped": report.skipped, "lora": cfg.lora, **extra}
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches.steps_per_epoch()))
    tcfg = TrainConfig(
        model=str(cfg.model) if isinstance(cfg.model, (str, Path)) else "in-memory", data=cfg.data,
        seq_len=cfg.max_length, global_batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
        max_steps=steps, lr=cfg.default_lr(), betas=[0.9, 0.999], eps=1e-8, weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps, min_lr_ratio=0.0,
        precision=cfg.precision, fused_loss=False, device=cfg.device, eval_every=cfg.eval_every or steps,
        out_dir=str(cfg.out_dir), checkpoint_every=cfg.checkpoint_every, keep_last=cfg.keep_last,
        tensorboard=cfg.tensorboard, log_every=1, seed=cfg.seed)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / f"{kind}_config.json", dataclasses.asdict(cfg))  # first: it marks a run directory
    tokenizer.save(run_dir)
    write_json(run_dir / "data_report.json", {"train": report.to_dict(),
                                              "val": val_report.to_dict() if val_report else None, **counts})
    trainer = Trainer(model, tcfg, batches, loss_fn=loss_fn, eval_batches=eval_batches, run_dir=run_dir, env=env,
                      summary_extra=extra)
    summary = trainer.fit(resume=resume)
    if export and env.is_main and summary["status"] == "completed":
        summary.update(export_result(trainer.model, tokenizer, run_dir, cfg.lora, cfg.merge))
        write_json(run_dir / "summary.json", summary)
    summary["model"] = distributed.unwrap(trainer.model)
    summary["tokenizer"] = tokenizer
    return summary


def run_sft(cfg: SFTConfig, model=None, tokenizer=None, resume: bool = False, export: bool = True) -> dict[str, Any]:
    """Fine-tune on conversations; returns the run summary (also RUN/summary.json)."""
    def setup(model, tokenizer, examples, val, grad_accum, env):
        pad_id = tokenizer.eos_token_id
        batches = sft_batches(examples, cfg.micro_batch_size, grad_accum, cfg.max_length, pad_id, cfg.packing,
                              cfg.seed, env.rank, env.world_size)
        # validation: every held-out conversation once, padded (independent of packing)
        eval_batches = [collate_padded(val[k:k + cfg.micro_batch_size], pad_id)
                        for k in range(0, len(val), cfg.micro_batch_size)]
        counts = {"train_examples": len(examples), "val_examples": len(val)}
        return batches, causal_lm_loss, eval_batches, {**counts, "rows_per_epoch": batches.per_epoch}, counts

    return finetune("sft", cfg, model, tokenizer, resume, export, build_sft_examples, setup)
