"""The training loop shared by pretraining, SFT and DPO.

The two seams (everything else is the same for every kind of training):

  batch_fn(step, micro) -> dict[str, Tensor]
      This process's micro-batch `micro` (0..grad_accum-1) of optimizer step `step`. Make it a pure function of
      (step, micro) and resume is exact: the loop saves only the step number as the data position.
      Pretraining uses data.PretrainBatches; SFT/DPO pass their own.

  loss_fn(model, batch) -> (loss, metrics)
      `loss` is a scalar mean over `metrics["loss_weight"]` units (tokens, pairs; 1 when absent). The loop weights
      micro-batches and processes by it, so the step's loss is the exact mean over the global batch whatever the
      split. Other float metrics are averaged over micro-batches and logged. Pretraining uses
      losses.fused_causal_lm_loss; DPO passes dpo.make_dpo_loss_fn(...).

Usage:
    trainer = Trainer(model, cfg, batch_fn, loss_fn=..., eval_batches=[...], run_dir=...)
    summary = trainer.fit(resume=True)

The Trainer moves the model to the device, applies activation checkpointing / torch.compile, wraps it for DDP or
FSDP2 under torchrun, owns the optimizers (AdamW, or Muon + AdamW), the schedule, loss scaling, the NaN guard,
checkpoints, metrics, the progress bar and the final report.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch import nn

from ..files import write_json, write_text_atomic
from ..progress import tqdm
from . import checkpointing, distributed, report
from .config import TrainConfig
from .distributed import DistEnv
from .losses import causal_lm_loss, fused_causal_lm_loss
from ..model import PhiForCausalLM, decoder_block_parameters
from .muon import Muon

Batch = dict[str, torch.Tensor]
BatchFn = Callable[[int, int], Batch]
LossFn = Callable[[nn.Module, Batch], "tuple[torch.Tensor, dict[str, Any]]"]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant, cosine or WSD."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(cfg.max_steps * cfg.decay_fraction))
        decay_start = cfg.max_steps - decay_steps
        if step < decay_start:
            return cfg.lr
        return cfg.lr - (cfg.lr - floor) * (step - decay_start + 1) / decay_steps
    return cfg.lr


def build_optimizers(model: nn.Module, cfg: TrainConfig, sharded: bool) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on matrices only (not on biases and LayerNorm parameters); with
    `optimizer: muon`, the matrices inside the decoder blocks go to Muon instead (orthogonalized momentum: small
    models learn lookup-like facts many times faster) and AdamW keeps the embedding, lm_head and vectors.
    Each group remembers its peak learning rate as `base_lr`; the schedule scales all of them alike."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    blocks = {id(p) for p in decoder_block_parameters(model)} if cfg.optimizer == "muon" else set()
    muon = [p for p in trainable if p.dim() == 2 and id(p) in blocks]
    taken = {id(p) for p in muon}
    rest = [p for p in trainable if id(p) not in taken]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "base_lr": cfg.lr}]
    # The fused kernel does the whole update in one pass per tensor (much faster on the CPU than foreach);
    # FSDP2's sharded DTensor parameters use the foreach path.
    impl = {"foreach": True} if sharded else {"fused": True}
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl)]
    if muon:
        optimizers.append(Muon([{"params": muon, "base_lr": cfg.muon_lr}], lr=cfg.muon_lr,
                               weight_decay=cfg.weight_decay, momentum=0.95))
    return optimizers


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, batch_fn: BatchFn, *, loss_fn: LossFn | None = None,
                 eval_batches: list[Batch] | None = None, run_dir: str | Path | None = None,
                 env: DistEnv | None = None, token_bytes: np.ndarray | None = None,
                 summary_extra: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.env = env or distributed.init_distributed(cfg.device)
        self.run_dir = Path(run_dir or cfg.out_dir)
        self.batch_fn = batch_fn
        self.eval_batches = eval_batches or []
        self.token_bytes = torch.from_numpy(token_bytes) if token_bytes is not None else None
        self.summary_extra = dict(summary_extra or {})
        self.grad_accum = cfg.grad_accum(self.env.world_size)
        self.amp_dtype = AMP_DTYPES.get(cfg.precision)
        self.config = getattr(model, "config", None)  # PhiConfig, for FLOPs and export

        on_meta = any(p.is_meta for p in model.parameters())
        if not on_meta:
            model.to(self.env.device)
        has_blocks = isinstance(model, PhiForCausalLM)  # not a peft wrapper, whose blocks stay as they are
        if cfg.activation_checkpointing and has_blocks:
            distributed.enable_activation_checkpointing(model)
        if cfg.compile and has_blocks:
            distributed.compile_blocks(model)
        strategy = cfg.strategy if cfg.strategy != "auto" else "ddp"
        mp = self.amp_dtype if strategy == "fsdp" else None
        if on_meta and strategy != "fsdp":
            model.materialize(self.env.device, cfg.seed * 1_000_003 + self.env.rank)
        self.model, self.strategy = distributed.wrap_model(model, self.env, strategy, cfg.reshard_after_forward, mp)
        if on_meta and strategy == "fsdp":
            self.model.materialize(self.env.device, cfg.seed * 1_000_003 + self.env.rank)
        self.sharded = self.strategy == "fsdp"
        # Dropout draws from torch's global generator: seeded per run and process, so a run repeats with its seed
        # and each process of a job draws its own masks (resuming restores the saved generator states over this).
        torch.manual_seed(cfg.seed * 1_000_003 + self.env.rank + 1)
        if loss_fn is None:
            # The fused loss reads lm_head outside the forward; FSDP2 reshards it there, so it uses plain logits.
            loss_fn = fused_causal_lm_loss if cfg.fused_loss and not self.sharded else causal_lm_loss
        self.loss_fn = loss_fn
        self.optimizers = build_optimizers(self.model, cfg, self.sharded)
        # fp16 needs dynamic loss scaling (the paper's recipe); bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self.tokens = 0
        self.skipped_steps = 0
        self.bad_streak = 0
        self.elapsed = 0.0
        self.stop_signal: int | None = None
        self._started = time.perf_counter()
        self.last: dict[str, Any] = {}

    # --- pieces ---
    def _autocast(self):
        if self.amp_dtype is None or self.sharded:  # FSDP2 applies the compute dtype itself
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.env.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _trainer_state(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "skipped_steps": self.skipped_steps, "bad_streak": self.bad_streak,
                "elapsed": self.elapsed + time.perf_counter() - self._started,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "model_config": self.config.to_hf_dict() if hasattr(self.config, "to_hf_dict") else None,
                "config": self.cfg.to_dict(), "world_size": self.env.world_size}

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        cfg, env = self.cfg, self.env
        lr = lr_at(self.step, cfg)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr * group.get("base_lr", cfg.lr) / cfg.lr  # older checkpoints: AdamW only
        # Backward on loss * weight / norm keeps gradients O(1); the exact mean is restored below.
        norm = float(cfg.micro_batch_size * cfg.seq_len)
        weighted_loss, weight, tokens = 0.0, 0.0, 0
        extra: dict[str, list[float]] = {}
        for micro in range(self.grad_accum):
            batch = self._to_device(self.batch_fn(self.step, micro))
            tokens += int(batch["input_ids"].numel())
            with distributed.no_sync(self.model, self.strategy, micro == self.grad_accum - 1), self._autocast():
                loss, metrics = self.loss_fn(self.model, batch)
            w = metrics.get("loss_weight", 1)
            self.scaler.scale(loss.float() * (w / norm)).backward()
            weighted_loss += float(loss.detach().float() * w)
            weight += float(w)
            for k, v in metrics.items():
                if k != "loss_weight" and (isinstance(v, (int, float)) or torch.is_tensor(v) and v.numel() == 1):
                    extra.setdefault(k, []).append(float(v))
        weighted_loss, weight, tokens = distributed.all_reduce([weighted_loss, weight, tokens], env)
        params = [p for p in self.model.parameters() if p.grad is not None]
        for opt in self.optimizers:
            self.scaler.unscale_(opt)
        factor = env.world_size * norm / max(weight, 1e-12)  # DDP/FSDP average over processes: undo, then mean
        torch._foreach_mul_([p.grad for p in params], factor)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        loss = weighted_loss / max(weight, 1e-12)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            for opt in self.optimizers:
                self.scaler.step(opt)  # skips the update itself when gradients overflowed
            self.scaler.update()
            overflow = self.scaler.get_scale() < scale
            finite = math.isfinite(loss)  # an fp16 gradient overflow is routine: the scale drops and we go on
        elif finite:
            for opt in self.optimizers:
                opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        record = {"event": "train", "step": self.step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": int(tokens)}
        record.update({k: float(np.mean(v)) for k, v in extra.items()})
        if self.scaler.is_enabled():
            record["loss_scale"] = self.scaler.get_scale()
            record["overflow"] = bool(overflow)
        if finite:
            self.bad_streak = 0
        else:
            self.bad_streak += 1
            self.skipped_steps += 1
            record["skipped"] = True
            tqdm.write(f"step {self.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                       f"skipped the update ({self.bad_streak} in a row)") if env.is_main else None
            if self.bad_streak > cfg.max_bad_steps:
                raise TrainingDiverged(
                    f"training diverged: {self.bad_streak} consecutive steps with a NaN/inf loss or gradient at "
                    f"step {self.step + 1}; lower lr, enable grad_clip, use bf16 instead of fp16, or resume from "
                    "an earlier checkpoint")
        self.step += 1
        self.tokens += int(tokens)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out loss (nats/token) and bits per byte, summed over all processes."""
        self.model.eval()
        weighted, weight, nbytes = 0.0, 0.0, 0.0
        for batch in self.eval_batches:
            batch = self._to_device(batch)
            with self._autocast():
                loss, metrics = self.loss_fn(self.model, batch)
            w = float(metrics.get("loss_weight", 1))
            weighted += float(loss.float()) * w
            weight += w
            if self.token_bytes is not None and "labels" in batch:
                targets = batch["labels"][:, 1:].cpu()
                nbytes += float(self.token_bytes[targets.clamp(min=0)][targets != -100].sum())
        self.model.train()
        weighted, weight, nbytes = distributed.all_reduce([weighted, weight, nbytes], self.env)
        out = {"event": "eval", "step": self.step, "val_loss": weighted / max(weight, 1e-12)}
        if nbytes:
            out["val_bpb"] = weighted / (nbytes * math.log(2))
        return out

    def save(self) -> Path:
        return checkpointing.save_checkpoint(self.run_dir, self.step, self.model, self.optimizers,
                                             self._trainer_state(), self.env, self.cfg.keep_last)

    def resume(self) -> bool:
        path = checkpointing.find_resumable(self.run_dir, self.env)
        if path is None:
            return False
        state = checkpointing.load_checkpoint(path, self.model, self.optimizers, self.env)
        self.step, self.tokens = state["step"], state["tokens"]
        self.skipped_steps, self.bad_streak, self.elapsed = state["skipped_steps"], state["bad_streak"], state["elapsed"]
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self.env.is_main:
            tqdm.write(f"resumed from {path} at step {self.step}")
        return True

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum  # finish the current step, checkpoint, then stop

    # --- the run ---
    def fit(self, resume: bool = False) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier(env)
        resumed = self.resume() if resume else False
        if not resumed and checkpointing.list_checkpoints(self.run_dir):
            if resume:  # asked to resume, but every checkpoint failed its checksums (warned above)
                raise ValueError(f"no checkpoint in {self.run_dir / 'checkpoints'} is complete and intact, so there "
                                 "is nothing to resume from: delete them to start over, or choose another out_dir")
            raise ValueError(f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, "
                             "or choose another out_dir")
        if resume and not resumed and env.is_main:  # the first run of a job that always passes --resume
            tqdm.write(f"no checkpoint in {self.run_dir / 'checkpoints'} yet: starting a new run")
        if env.is_main:
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log = report.MetricsLog(self.run_dir, env.is_main, cfg.tensorboard, self.step if resumed else None)
        seq_len = cfg.seq_len
        flops_per_token = self.config.flops_per_token(seq_len) if hasattr(self.config, "flops_per_token") else 0.0
        peak = report.matmul_peak_flops(env.device, self.amp_dtype or torch.float32)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not env.is_main, unit="step", dynamic_ncols=True)
        status = "completed"
        window_tokens, window_start = 0, time.perf_counter()
        run_start, run_tokens = time.perf_counter(), 0
        self._started = run_start
        try:
            self.model.train()
            while self.step < cfg.max_steps:
                record = self.train_step()
                window_tokens += record["tokens"]
                run_tokens += record["tokens"]
                now = time.perf_counter()
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    dt = now - window_start
                    tps = window_tokens / dt / env.world_size  # per process
                    record.update(tokens_per_s=tps, mfu=tps * flops_per_token / peak if peak else 0.0)
                    window_tokens, window_start = 0, now
                    log.log(record)
                    self.last.update(loss=record["loss"], tokens_per_s=tps, mfu=record["mfu"])
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps * env.world_size:,.0f}",
                                    mfu=f"{record['mfu']:.1%}", refresh=False)
                bar.update(1)
                if self.eval_batches and cfg.eval_every and (self.step % cfg.eval_every == 0
                                                             or self.step == cfg.max_steps):
                    ev = self.evaluate()
                    log.log(ev)
                    self.last.update(val_loss=ev["val_loss"], val_bpb=ev.get("val_bpb"))
                    bar.write(f"step {self.step}: held-out loss {ev['val_loss']:.4f}"
                              + (f", {ev['val_bpb']:.4f} bits/byte" if "val_bpb" in ev else "")) \
                        if env.is_main else None
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                stop = distributed.all_reduce([float(self.stop_signal or 0)], env, op="max")[0]
                if stop:
                    status = f"stopped by {signal.Signals(int(stop)).name}"
                    break
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                    self.save()
            path = self.save()
            if env.is_main:
                bar.write(f"{status} at step {self.step}; checkpoint {path}")
        finally:
            bar.close()
            log.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        run_time = max(time.perf_counter() - run_start, 1e-9)
        tps = run_tokens / run_time / env.world_size
        summary = {**self.last, "status": status, "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed + run_time,
                   "tokens_per_s": tps, "mfu": tps * flops_per_token / peak if peak else 0.0, "peak_flops": peak,
                   "skipped_steps": self.skipped_steps, "world_size": env.world_size, "strategy": self.strategy,
                   "parameters": sum(p.numel() for p in distributed.unwrap(self.model).parameters()),
                   **self.summary_extra}
        if env.is_main:
            write_json(self.run_dir / "summary.json", summary)
            report.write_report(self.run_dir, summary, cfg.to_dict())
        return summary
