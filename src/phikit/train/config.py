"""TrainConfig: one flat YAML file per run, plus `key=value` overrides on the command line.

Every key is a field below; an unknown key is an error (with the nearest known key suggested), so a typo never
silently trains with a default. `model_config.NAME=VALUE` overrides one field of the model preset.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import PRESETS, PhiConfig, get_config

SCHEDULES = ("constant", "cosine", "wsd")
PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("auto", "ddp", "fsdp")
OPTIMIZERS = ("adamw", "muon")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    # --- model ---
    model: str = "tiny"                     # a preset name (phikit.config.PRESETS) or a checkpoint to start from
    model_config: dict[str, Any] = field(default_factory=dict)  # PhiConfig field overrides of the preset
    # --- data ---
    data: str = ""                          # a token-shard directory, or a mixture spec (.yaml/.json)
    seq_len: int = 256                      # tokens per training sequence
    document_masking: bool = False          # block attention across the documents packed into one sequence
    # --- batch: global_batch_size = micro_batch_size * grad_accum * world_size ---
    global_batch_size: int = 32             # sequences per optimizer step, over all processes
    micro_batch_size: int = 8               # sequences per forward/backward on one process
    max_steps: int = 100
    # --- optimizer ---
    optimizer: str = "adamw"                # adamw | muon (Muon on the blocks' matrices, AdamW on the rest)
    lr: float = 2e-4                        # AdamW's peak learning rate (embeddings, lm_head, biases, LayerNorms)
    muon_lr: float = 0.02                   # muon: peak learning rate of the blocks' matrices (same schedule)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-7
    weight_decay: float = 0.1
    grad_clip: float = 1.0                  # max global gradient norm; 0 disables clipping
    # --- learning-rate schedule ---
    schedule: str = "constant"              # constant | cosine (warm-up + cosine) | wsd (warm-up, stable, decay)
    warmup_steps: int = 0
    decay_fraction: float = 0.2             # wsd: share of max_steps spent decaying at the end
    min_lr_ratio: float = 0.1               # cosine/wsd floor as a fraction of lr
    # --- numerics and speed ---
    precision: str = "fp32"                 # fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling)
    activation_checkpointing: bool = False
    compile: bool = False                   # torch.compile the decoder blocks (opt-in: minutes of warm-up)
    fused_loss: bool = True                 # chunked lm_head + cross-entropy that never holds all logits
    # --- distributed (torchrun) ---
    strategy: str = "auto"                  # auto: ddp for several processes; fsdp: FSDP2 fully_shard
    reshard_after_forward: bool = True      # fsdp: True = ZeRO-3 (shard params), False = ZeRO-2 style
    device: str = "auto"                    # auto | cpu | cuda
    # --- evaluation ---
    eval_every: int = 50                    # steps between held-out evaluations; 0 disables
    eval_sequences: int = 32                # held-out sequences per evaluation
    # --- checkpoints, logging ---
    out_dir: str = "runs/train"
    checkpoint_every: int = 100             # steps between checkpoints; 0 = only at the end and on a signal
    keep_last: int = 3                      # checkpoints kept (older ones are deleted)
    log_every: int = 1
    tensorboard: bool = True
    max_bad_steps: int = 5                  # consecutive NaN/inf steps before the run stops
    seed: int = 0

    # --- derived ---
    def grad_accum(self, world_size: int = 1) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size} x {world_size} process(es) = {per_step}: change one of them")
        return self.global_batch_size // per_step

    def model_preset(self) -> PhiConfig | None:
        """The PhiConfig for a preset name, or None when `model` is a checkpoint path."""
        if self.model in PRESETS:
            return get_config(self.model, **self.model_config)
        return None

    def validate(self) -> "TrainConfig":
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not self.data:
            bad("no training data: set data=DIR (token shards from `phikit data pack`) or a mixture spec file")
        if self.schedule not in SCHEDULES:
            bad(f"schedule {self.schedule!r} is unknown: choose one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            bad(f"precision {self.precision!r} is unknown: choose one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer {self.optimizer!r} is unknown: choose one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "muon" and self.strategy == "fsdp":
            bad("optimizer muon needs whole matrices and FSDP shards them: use strategy ddp, or optimizer adamw")
        if self.optimizer == "muon" and self.muon_lr <= 0:
            bad(f"muon_lr must be > 0, got {self.muon_lr}")
        if self.strategy not in STRATEGIES:
            bad(f"strategy {self.strategy!r} is unknown: choose one of {', '.join(STRATEGIES)}")
        if self.device not in DEVICES:
            bad(f"device {self.device!r} is unknown: choose one of {', '.join(DEVICES)}")
        for name in ("global_batch_size", "micro_batch_size", "max_steps", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                bad(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:  # labels are the inputs shifted by one: one token predicts nothing
            bad(f"seq_len must be at least 2, got {self.seq_len}")
        # 0 means "off" for these; a negative value would silently act as a period (step % -k) or as "off".
        for name in ("eval_every", "eval_sequences", "checkpoint_every", "max_bad_steps", "grad_clip",
                     "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eps <= 0:  # Adam divides by sqrt(v) + eps: 0/0 = NaN for any parameter whose gradient is 0
            bad(f"eps must be > 0, got {self.eps}")
        if self.micro_batch_size > self.global_batch_size:
            bad(f"micro_batch_size {self.micro_batch_size} exceeds global_batch_size {self.global_batch_size}: "
                "lower micro_batch_size")
        self.grad_accum(1)
        if self.lr <= 0:
            bad(f"lr must be > 0, got {self.lr}")
        for name in ("min_lr_ratio", "decay_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                bad(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.max_steps and self.schedule != "constant":
            bad(f"warmup_steps {self.warmup_steps} must be in [0, max_steps {self.max_steps})")
        preset = self.model_preset()
        if preset is None and not Path(self.model).exists():
            bad(f"model {self.model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint "
                "directory: fix the name or the path")
        if preset is not None and self.seq_len > preset.max_position_embeddings:
            bad(f"seq_len {self.seq_len} exceeds the model context {preset.max_position_embeddings}: lower seq_len "
                "or set model_config.max_position_embeddings")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _unknown(key: str, known) -> ValueError:
    near = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else f"; known keys: {', '.join(sorted(known))}"
    return ValueError(f"unknown config key {key!r}{hint}")


def _number(value: Any, want: type) -> int | float:
    """`value` (a number, or a string of one) as `want`; a bool, or a fraction for an int, is a ValueError."""
    number = float(value) if isinstance(value, str) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or \
            want is int and not float(number).is_integer():
        raise ValueError
    return want(number)


def _coerce(key: str, value: Any) -> Any:
    """Give a YAML or command-line value the field's type (YAML reads `1e-3` as a string)."""
    kind = _HINTS[key]
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int:
            return _number(value, int)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
        if typing.get_origin(kind) is list:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            return [float(v) for v in value]
        if typing.get_origin(kind) is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"config key {key!r} expects {getattr(kind, '__name__', kind)}, got {value!r}")


_MODEL_HINTS = typing.get_type_hints(PhiConfig)


def _model_override(name: str, value: Any) -> Any:
    model_fields = {f.name: f for f in dataclasses.fields(PhiConfig)}
    if name not in model_fields or name == "extra":
        raise _unknown(f"model_config.{name}", [f"model_config.{k}" for k in model_fields if k != "extra"])
    value = yaml.safe_load(value) if isinstance(value, str) else value
    kind = _MODEL_HINTS[name]
    if value is None and type(None) in typing.get_args(kind):  # e.g. tokenizer_vocab_size: null
        return None
    # PhiConfig's fields are ints and floats: give the value that type here, or say which key is wrong (a string
    # would otherwise only fail deep inside the model constructor).
    want = int if kind is int or int in typing.get_args(kind) else float
    try:
        return _number(value, want)
    except (TypeError, ValueError):
        raise ValueError(f"config key 'model_config.{name}' expects {want.__name__}, got {value!r}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                validate: bool = True) -> TrainConfig:
    """Read a YAML config (or start from the defaults), apply `key=value` overrides, check everything."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found: pass an existing YAML file (see configs/)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}): fix the file") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of key: value lines")
        values.update(loaded)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value: write e.g. lr=3e-4")
        key = key.strip()
        if key.startswith("model_config."):
            values.setdefault("model_config", {})
            values["model_config"] = {**values["model_config"],
                                      key.split(".", 1)[1]: _model_override(key.split(".", 1)[1], raw)}
        else:
            values[key] = raw
    for key in values:
        if key not in _FIELDS:
            raise _unknown(key, _FIELDS)
    if values.get("model_config") is not None:
        if not isinstance(values["model_config"], dict):
            raise ValueError(f"model_config must be a mapping of PhiConfig fields, got {values['model_config']!r}")
        values["model_config"] = {k: _model_override(k, v) for k, v in values["model_config"].items()}
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    return cfg.validate() if validate else cfg
