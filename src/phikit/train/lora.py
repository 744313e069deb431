"""LoRA adapters through peft, on phikit's module names (the same names as transformers' PhiForCausalLM, so an
adapter saved here also loads onto transformers' model with `peft.PeftModel.from_pretrained`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import LORA_TARGETS, TOKEN_ROW_MODULES
from ..files import staged_dir


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
        trainable_token_indices={name: tokens for name in TOKEN_ROW_MODULES} if tokens else None,
    )
    return keep_lm_head_bias(get_peft_model(model, config))


@torch.no_grad()
def keep_lm_head_bias(peft_model):
    """Add lm_head's bias back where peft drops it. peft trains new token rows of a Linear (lm_head) through a
    product without the layer's bias (peft 0.21: `F.linear(x, W)`), so the adapted model would train without phi's
    lm_head bias and differ from the merged model it exports (logits off by the bias). A probe finds out whether
    this peft version drops it; only then a hook adds it on the adapter's path (merged or disabled adapters run the
    base layer, bias included)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    def add_bias(layer, args, output):
        if layer.merged or layer.disable_adapters or not layer.active_adapters:
            return output
        return output + layer.base_layer.bias

    for layer in peft_model.modules():
        base = getattr(layer, "base_layer", None)
        if not (isinstance(layer, TrainableTokensLayer) and isinstance(base, torch.nn.Linear)
                and base.bias is not None and not getattr(layer, "_phikit_bias_hook", False)):
            continue
        probe = torch.ones(1, base.in_features, device=base.weight.device, dtype=base.weight.dtype)
        adapted = torch.nn.functional.linear(probe, layer.get_merged_weights(layer.active_adapters))
        if base.bias.any() and torch.allclose(layer(probe), adapted, rtol=1e-3, atol=1e-3):
            layer.register_forward_hook(add_bias)
            layer._phikit_bias_hook = True
    return peft_model


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def save_adapter(model, directory: str | os.PathLike) -> Path:
    """adapter_config.json + adapter_model.safetensors in peft's format, whole or not at all; an existing adapter
    directory there is replaced, anything else refused."""
    if not is_lora(model):
        raise ValueError("model has no LoRA adapter to save: apply_lora first, or save the full model")
    with staged_dir(directory, "adapter") as tmp:
        model.save_pretrained(tmp)
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
    return keep_lm_head_bias(PeftModel.from_pretrained(model, str(directory), config=config, is_trainable=trainable))


@torch.no_grad()
def merge_adapter(model):
    """The base model with the adapter folded into its weights (W + B A * alpha / r), adapter layers removed."""
    if not is_lora(model):
        raise ValueError("model has no LoRA adapter to merge")
    return model.merge_and_unload()

