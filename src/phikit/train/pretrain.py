"""Pretraining: a TrainConfig in, a trained run directory out (checkpoints, metrics, report, exported model)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..files import check_output
from ..model import build_model
from . import checkpointing, distributed
from .config import TrainConfig
from .data import Mixture, PretrainBatches, heldout_batches, token_byte_lengths, unigram_loss
from .loop import Trainer

META_INIT_PARAMETERS = 100_000_000  # FSDP runs above this size never hold a full model on one process


def run_pretraining(cfg: TrainConfig, resume: bool = False, export: bool = True) -> dict[str, Any]:
    """Check everything that can be checked, build model and data, train, report, export the final model."""
    check_output(cfg.out_dir, "run")  # a directory of the user's own files is not a run directory to write into
    env = distributed.init_distributed(cfg.device)
    try:
        cfg.grad_accum(env.world_size)  # an impossible batch split fails here, before any compute
        mixture = Mixture.from_path(cfg.data)
        config = cfg.model_preset()
        if config is not None:
            mixture.check(cfg.seq_len, config.vocab_size)
            if config.tokenizer_vocab_size is None and mixture.vocab_size < config.vocab_size:
                config = config.replace(tokenizer_vocab_size=mixture.vocab_size)  # rows past it are padding
            if not {"bos_token_id", "eos_token_id"} & set(cfg.model_config):
                # The data's tokenizer defines eos (the preset's is phi's 50256): the exported config.json and
                # generation_config.json must name it, or transformers' generate never stops.
                config = config.replace(bos_token_id=mixture.eos_id, eos_token_id=mixture.eos_id)
            meta = cfg.strategy == "fsdp" and config.num_parameters() > META_INIT_PARAMETERS
            model = build_model(config, seed=cfg.seed, meta=meta)
        else:  # continue pretraining from a checkpoint
            from ..checkpoint import load_config

            config = load_config(Path(cfg.model))
            mixture.check(cfg.seq_len, config.vocab_size)
            if cfg.seq_len > config.max_position_embeddings:
                raise ValueError(f"seq_len {cfg.seq_len} exceeds the model context {config.max_position_embeddings}")
            from ..checkpoint import load

            model, _ = load(cfg.model)
        run_dir = Path(cfg.out_dir)
        batches = PretrainBatches(mixture, cfg.seq_len, cfg.global_batch_size, cfg.micro_batch_size, env.rank,
                                  env.world_size, cfg.seed, cfg.document_masking)
        heldout = heldout_batches(mixture, cfg.seq_len, cfg.eval_sequences, cfg.micro_batch_size, env.rank,
                                  env.world_size, cfg.document_masking)
        extra: dict[str, Any] = {}
        token_bytes = None
        if mixture.tokenizer_path.is_file():
            token_bytes = token_byte_lengths(mixture.tokenizer_path, config.vocab_size)
            if env.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(mixture.tokenizer_path, run_dir / "tokenizer.json")
        if env.is_main and heldout:
            full = heldout_batches(mixture, cfg.seq_len, cfg.eval_sequences, cfg.micro_batch_size)
            extra["unigram_loss"] = unigram_loss(mixture, full)
        trainer = Trainer(model, cfg, batches, eval_batches=heldout, run_dir=run_dir, env=env,
                          token_bytes=token_bytes, summary_extra=extra)
        summary = trainer.fit(resume=resume)
    finally:
        distributed.shutdown()
    if export and env.is_main and summary["status"] == "completed":
        out = checkpointing.export_checkpoint(run_dir, run_dir / "model")
        summary["model_dir"] = str(out)
    return summary
