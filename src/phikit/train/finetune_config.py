"""The settings of SFT and DPO runs, as plain data: the CLI reads their defaults without loading torch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

LOSS_TYPES = ("sigmoid", "robust", "ipo")
REFERENCE_MODES = ("copy", "precompute", "adapter")
SCHEDULES = ("constant", "cosine", "wsd")


@dataclass
class FineTuneConfig:
    """What SFT and DPO runs share; SFTConfig and DPOConfig add their own fields and defaults."""
    model: str = ""                 # checkpoint directory or HF repo id (phikit.load)
    data: str = ""                  # .jsonl / .json / .parquet
    val_data: str | None = None     # held-out file; else val_fraction of data
    val_fraction: float = 0.0
    out_dir: str = "runs/sft"
    max_length: int = 0             # tokens per row; 0: the model's context (capped at longest_default)
    batch_size: int = 8             # rows (SFT) or pairs (DPO) per optimizer step
    micro_batch_size: int = 8       # per forward/backward (gradient accumulation makes up the rest)
    epochs: float = 1.0             # used when max_steps is 0
    max_steps: int = 0
    lr: float = 0.0                 # 0: default_lr()
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    merge: bool = True              # with LoRA, also write the merged model
    on_bad: str = "skip"            # skip | error: malformed items, unknown roles, no assistant turn, ...
    too_long: str = "skip"          # skip | truncate | error
    eval_every: int = 0             # 0: evaluate at the end only (when there is validation data)
    checkpoint_every: int = 0
    keep_last: int = 2
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0
    tensorboard: bool = False

    longest_default: ClassVar[int | None] = None  # max_length 0 means min(the model's context, this)
    full_lr: ClassVar[float] = 2e-5  # the learning rate when lr is 0, for full fine-tuning
    lora_lr: ClassVar[float] = 2e-4  # ... and with LoRA

    def default_lr(self) -> float:
        return self.lr or (self.lora_lr if self.lora else self.full_lr)

    def check(self) -> "FineTuneConfig":
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is unknown: choose one of {', '.join(SCHEDULES)}")
        for name in ("batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_length < 0:
            raise ValueError(f"max_length must be at least 1 (or 0 for the model's context), got {self.max_length}")
        for flag, path in (("--data", self.data), ("--val-data", self.val_data)):
            # Checked before the model loads: a directory or a typo should not cost a minute of loading first.
            if path and Path(path).is_dir():
                raise ValueError(f"{flag} {path} is a directory: pass a .jsonl, .json or .parquet file")
            if path and not Path(path).exists():
                raise FileNotFoundError(f"{flag} {path} does not exist: pass a .jsonl, .json or .parquet file")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}: change one of them")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ValueError("max_steps must be >= 0 and epochs > 0")
        if self.lr < 0:  # 0 stands for the default
            raise ValueError(f"--lr must be > 0 (or 0 for the default), got {self.lr}")
        return self


@dataclass
class SFTConfig(FineTuneConfig):
    packing: bool = True            # pack short conversations into max_length rows (attention stays inside each)



@dataclass
class DPOConfig(FineTuneConfig):
    """The fields of FineTuneConfig (model: usually the SFT'd checkpoint; data: preference pairs), plus DPO's."""
    out_dir: str = "runs/dpo"
    max_length: int = 0             # tokens of prompt + answer; 0: the model's context, at most 1024
    longest_default: ClassVar[int | None] = 1024
    micro_batch_size: int = 4
    beta: float = 0.1
    loss_type: str = "sigmoid"      # sigmoid | robust | ipo
    label_smoothing: float = 0.0
    reference: str = ""             # copy | precompute | adapter ("" : adapter with LoRA, else copy)

    full_lr: ClassVar[float] = 5e-7
    lora_lr: ClassVar[float] = 5e-6  # Phi-1_5-Instruct's DPO used LoRA

    def reference_mode(self) -> str:
        mode = self.reference or ("adapter" if self.lora else "copy")
        if mode not in REFERENCE_MODES:
            raise ValueError(f"unknown reference {mode!r}: choose one of {', '.join(REFERENCE_MODES)}")
        if mode == "adapter" and not self.lora:
            raise ValueError("reference 'adapter' needs --lora: use --reference copy or precompute")
        return mode

    def check(self) -> "DPOConfig":
        super().check()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss {self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError("beta must be > 0 and label_smoothing in [0, 0.5)")
        self.reference_mode()
        return self
