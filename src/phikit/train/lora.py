"""LoRA adapters through peft, on phikit's module names (the same names as transformers' PhiForCausalLM, so an
adapter saved here also loads onto transformers' model with `peft.PeftModel.from_pretrained`)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

# Attention projections and the MLP of every block.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")


def apply_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.05, targets: Sequence[str] = LORA_TARGETS,
               train_token_ids: Sequence[int] = ()):
    """Wrap `model` in a peft LoRA model; only adapter weights (and the rows of `train_token_ids`, e.g. freshly
    added ChatML tokens, in the embedding and lm_head) are trainable afterwards."""
    from peft import LoraConfig, get_peft_model

    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target modules {sorted(unknown)}: choose from {', '.join(LORA_TARGETS)}")
    tokens = sorted(set(train_token_ids))
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
        # New special tokens need their own rows trained: without it <|im_start|> stays at its initial vector.
        trainable_token_indices={"embed_tokens": tokens, "lm_head": tokens} if tokens else None,
    )
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def save_adapter(model, directory: str | os.PathLike) -> Path:
    """adapter_config.json + adapter_model.safetensors in peft's format, written to a temp dir then renamed."""
    if not is_lora(model):
        raise ValueError("model has no LoRA adapter to save: apply_lora first, or save the full model")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_adapter(model, directory: str | os.PathLike, trainable: bool = False):
    """Attach a saved adapter (phikit's, or peft's from transformers' PhiForCausalLM) to a base phikit model."""
    from peft import PeftConfig, PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").exists():
        raise FileNotFoundError(f"{directory} has no adapter_config.json: pass a directory written by "
                                "`phikit sft --lora` or `phikit dpo --lora`")
    config = PeftConfig.from_pretrained(str(directory))
    # Adapters trained on transformers' model usually say task_type CAUSAL_LM, whose peft wrapper needs
    # transformers' generation methods, which phikit's model does not have; the plain wrapper loads the same weights.
    config.task_type = None
    return PeftModel.from_pretrained(model, str(directory), config=config, is_trainable=trainable)


@torch.no_grad()
def merge_adapter(model):
    """The base model with the adapter folded into its weights (W + B A * alpha / r), adapter layers removed."""
    if not is_lora(model):
        raise ValueError("model has no LoRA adapter to merge")
    return model.merge_and_unload()


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
