"""Direct preference optimization (DPO) on ChatML preference pairs.

Pairs are read in the shapes preference sets use:
    UltraFeedback-binarized  {"prompt": str, "chosen": [user msg, assistant msg], "rejected": [...]}
    conversational (trl)     {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]}
    plain                    {"prompt"|"question"|"input"|"instruction": str, "chosen": str, "rejected": str}
plus an optional "system" string, or a "messages" list standing for the prompt.

Losses (Rafailov et al. 2023; Azar et al. 2023), with the margin  d = (log pi(yw) - log ref(yw)) -
(log pi(yl) - log ref(yl))  of summed completion log-probs:
    sigmoid  -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)   (eps: label smoothing, "conservative DPO")
    robust   (-(1 - eps) log sigmoid(beta d) + eps log sigmoid(-beta d)) / (1 - 2 eps)
    ipo      (d_w / |yw| - d_l / |yl| - 1 / (2 beta))^2, log-ratios averaged per completion token as in trl
Rewards are beta * (log pi - log ref); logged as rewards/chosen, rewards/rejected, rewards/accuracies (chosen
strictly above rejected) and rewards/margins, the names trl logs.

The reference is a frozen copy of the starting model, the same model with its LoRA adapter switched off, or
log-probs computed once before training (then no second model is kept in memory).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..progress import tqdm
from ..tokenizer import IM_END, Tokenizer
from .chat_data import (IGNORE_INDEX, BadExample, DataReport, Example, _message, build_examples, collate_padded,
                        render_chatml, tokenize_text_with_spans)
from .finetune_config import LOSS_TYPES, REFERENCE_MODES, DPOConfig  # noqa: F401 (the names run_dpo's users import)
from .sft import EpochBatches, finetune


# ---------------------------------------------------------------- pairs
def _messages(value: Any, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return [_message(t, i) for i, t in enumerate(value)]
    raise BadExample("malformed", f"'{field}' must be a string or a list of messages")


def _completion(value: Any, field: str) -> tuple[list[dict], str]:
    """(conversation before the answer, answer text) of a chosen/rejected field."""
    if isinstance(value, str):
        return [], value
    if isinstance(value, list) and value:
        turns = [_message(t, i) for i, t in enumerate(value)]
        if turns[-1]["role"] != "assistant":
            raise BadExample("no_assistant", f"'{field}' does not end with an assistant turn")
        return turns[:-1], turns[-1]["content"]
    raise BadExample("malformed", f"'{field}' must be a string or a non-empty list of messages")


def parse_preference(record: Any) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen answer, rejected answer) from any supported pair shape; raises BadExample."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise BadExample("malformed", "a preference pair needs 'chosen' and 'rejected' fields")
    chosen_prefix, chosen = _completion(record["chosen"], "chosen")
    rejected_prefix, rejected = _completion(record["rejected"], "rejected")
    if chosen_prefix or rejected_prefix:
        if chosen_prefix != rejected_prefix:
            raise BadExample("prompt_mismatch", "chosen and rejected conversations differ before the answer")
    prompt_field = next((record[k] for k in ("prompt", "question", "input", "instruction") if record.get(k)), None)
    if isinstance(prompt_field, list):
        prompt = _messages(prompt_field, "prompt") + chosen_prefix
    elif chosen_prefix:  # UltraFeedback: the conversations carry the prompt; the "prompt" string repeats it
        prompt = chosen_prefix
    elif prompt_field is not None:
        prompt = _messages(prompt_field, "prompt")
    elif isinstance(record.get("messages"), list):
        prompt = _messages(record["messages"], "messages")
        while prompt and prompt[-1]["role"] == "assistant":  # the chosen conversation stored as "messages"
            prompt.pop()
    else:
        raise BadExample("malformed", "pair has no prompt: give 'prompt' (text or messages) or 'messages'")
    system = record.get("system")
    if isinstance(system, str) and system.strip() and not any(m["role"] == "system" for m in prompt):
        prompt.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "user" for m in prompt):
        raise BadExample("no_prompt", "prompt has no user turn")
    if prompt[-1]["role"] == "assistant":
        raise BadExample("malformed", "prompt ends with an assistant turn: the answer belongs in chosen/rejected")
    if not chosen.strip() or not rejected.strip():
        raise BadExample("empty_turn", "chosen or rejected answer is empty")
    if chosen == rejected:
        raise BadExample("identical_pair", "chosen and rejected answers are identical, so there is no preference")
    return prompt, chosen, rejected


def tokenize_completion(tokenizer: Tokenizer, prompt: Sequence[dict], answer: str) -> Example:
    """ChatML prompt + answer + <|im_end|>; labels on the answer and <|im_end|> only."""
    prompt_text = render_chatml(prompt, add_generation_prompt=True)
    text = f"{prompt_text}{answer}{IM_END}\n"
    return tokenize_text_with_spans(tokenizer, text, [(len(prompt_text), len(text) - 1)])


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    ref_chosen: float | None = None  # reference log-probs, when precomputed
    ref_rejected: float | None = None

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def build_pair_examples(records: Iterable[Any], tokenizer: Tokenizer, max_length: int, on_bad: str = "skip",
                        too_long: str = "skip", source: str = "pair") -> tuple[list[PairExample], DataReport]:
    """Parse and tokenize preference pairs; bad or over-long pairs are counted, skipped or fatal."""
    if not tokenizer.has_chatml:
        raise ValueError("tokenizer has no <|im_start|>/<|im_end|> tokens: call add_chatml_tokens(model, tokenizer)")

    def make(record: Any) -> PairExample:
        prompt, chosen, rejected = parse_preference(record)
        return PairExample(tokenize_completion(tokenizer, prompt, chosen),
                           tokenize_completion(tokenizer, prompt, rejected))

    def cut(pair: PairExample) -> PairExample:
        pair = PairExample(*(Example(ex.input_ids[:max_length], ex.labels[:max_length])
                             for ex in (pair.chosen, pair.rejected)))
        if not pair.chosen.num_trained or not pair.rejected.num_trained:
            raise BadExample("too_long", f"prompt alone fills max_length {max_length}")
        return pair

    return build_examples(records, make, cut, max_length, on_bad, too_long, source)


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows, chosen first then rejected (a single forward pass scores both)."""
    batch = collate_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    if all(p.ref_chosen is not None for p in pairs):
        batch["ref_chosen_logps"] = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float64)
        batch["ref_rejected_logps"] = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float64)
    return batch


# ---------------------------------------------------------------- log-probs and loss
def completion_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each row, and how many there are: ([N], [N])."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"][:, 1:].to(logits.device)
    mask = labels != IGNORE_INDEX
    logps = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.clamp(min=0).flatten(),
                             reduction="none").view_as(labels)
    return (logps * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO loss over a batch of pairs, and the reward metrics trl logs. Inputs are [B] summed log-probs."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    ref_chosen, ref_rejected = ref_chosen.to(policy_chosen), ref_rejected.to(policy_rejected)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)
                  + label_smoothing * F.logsigmoid(-beta * margin)) / (1 - 2 * label_smoothing)
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completion token counts")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
    return losses.mean(), metrics


# ---------------------------------------------------------------- reference
def adapter_disabled(model) -> contextlib.AbstractContextManager:
    """The base model of a peft model (adapter switched off) inside the block."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError("reference 'adapter' needs a LoRA model: pass --lora or use --reference copy|precompute")
    return model.disable_adapter()


def frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def _pair_logps(model, pairs: Sequence[PairExample], batch_size: int, pad_id: int, device: torch.device | str,
                precision: str = "fp32") -> Iterator[tuple[list[PairExample], dict, torch.Tensor, torch.Tensor]]:
    """(pairs, batch, chosen log-probs, rejected log-probs) batch by batch, in eval mode under `precision`'s
    autocast; log-probs in float64 on the CPU."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    try:
        for k in tqdm(range(0, len(pairs), batch_size), desc="log-probs", unit="batch", leave=False):
            chunk = pairs[k:k + batch_size]
            batch = {n: t.to(device) for n, t in collate_pairs(chunk, pad_id).items()}
            with autocast:
                logps, _ = completion_logps(model, batch)
            yield (chunk, batch, *logps.double().cpu().chunk(2))
    finally:
        model.train(was_training)


def precompute_reference(model, pairs: Sequence[PairExample], batch_size: int, pad_id: int,
                         device: torch.device | str = "cpu", precision: str = "fp32") -> None:
    """Store the reference log-probs in each pair, so training needs no second model.

    `precision` must be the training run's: the policy's log-probs are computed under its autocast, and a reference
    computed otherwise would differ by rounding, so the rewards would not start at exactly 0."""
    for chunk, _, chosen, rejected in _pair_logps(model, pairs, batch_size, pad_id, device, precision):
        for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            p.ref_chosen, p.ref_rejected = c, r


def make_dpo_loss_fn(reference: str, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                     ref_model=None) -> Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict]]:
    """A loss function for the training loop: (model, batch) -> (loss, metrics).

    reference: "copy" (ref_model is a frozen copy), "adapter" (the policy with its LoRA adapter off) or
    "precompute" (the batch carries ref_chosen_logps / ref_rejected_logps).
    """
    if reference not in REFERENCE_MODES:
        raise ValueError(f"unknown reference mode {reference!r}: choose one of {', '.join(REFERENCE_MODES)}")
    if reference == "copy" and ref_model is None:
        raise ValueError("reference 'copy' needs ref_model (a frozen copy of the starting model)")

    def loss_fn(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logps, tokens = completion_logps(model, batch)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        if reference == "precompute":
            if "ref_chosen_logps" not in batch:
                raise ValueError("batch lacks precomputed reference log-probs: run precompute_reference first")
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            with torch.no_grad():
                if reference == "adapter":
                    with adapter_disabled(getattr(model, "module", model)):
                        ref_logps, _ = completion_logps(model, batch)
                else:
                    ref_logps, _ = completion_logps(ref_model, batch)
            ref_chosen, ref_rejected = ref_logps.chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing,
                        chosen_tokens, rejected_tokens)

    return loss_fn


def preference_accuracy(model, pairs: Sequence[PairExample], pad_id: int, batch_size: int = 32,
                        device: torch.device | str = "cpu") -> float:
    """Share of pairs whose chosen answer the model finds more likely than the rejected one.

    Sequence level: the summed log-probs of the answer and its <|im_end|>, i.e. the probability of giving exactly
    that answer and stopping, which is what sampling from the policy follows. A per-token mean would instead
    favour answers padded with likely tokens (it ranks a pair as the sum does when both answers are as long)."""
    if not pairs:
        raise ValueError("no preference pairs left after filtering: check the data report")
    wins = sum(int((chosen > rejected).sum()) for _, _, chosen, rejected
               in _pair_logps(model, pairs, batch_size, pad_id, device))
    return wins / len(pairs)


def reward_accuracy(model, pairs: Sequence[PairExample], pad_id: int, batch_size: int = 32,
                    device: torch.device | str = "cpu") -> float:
    """Share of pairs whose implicit DPO reward log pi/ref is higher for chosen (trl's rewards/accuracies) on
    pairs that carry reference log-probs (precompute_reference); ties count half, so the start is 0.5."""
    if any(p.ref_chosen is None for p in pairs):
        raise ValueError("pairs lack reference log-probs: run precompute_reference(reference_model, pairs, ...)")
    score = 0.0
    for _, batch, chosen, rejected in _pair_logps(model, pairs, batch_size, pad_id, device):
        margin = (chosen - batch["ref_chosen_logps"].cpu()) - (rejected - batch["ref_rejected_logps"].cpu())
        score += float((margin > 1e-9).sum()) + 0.5 * float((margin.abs() <= 1e-9).sum())
    return score / len(pairs)


# ---------------------------------------------------------------- the run
def with_pair_weight(loss_fn):
    """The loop weights micro-batches by metrics["loss_weight"]: for DPO, the number of pairs."""
    def weighted(model, batch):
        loss, metrics = loss_fn(model, batch)
        return loss, {**metrics, "loss_weight": batch["input_ids"].shape[0] // 2}
    return weighted


def run_dpo(cfg: DPOConfig, model=None, tokenizer=None, resume: bool = False, export: bool = True) -> dict[str, Any]:
    """Preference-tune a (usually SFT'd) model; returns the run summary (also RUN/summary.json)."""
    def setup(model, tokenizer, pairs, val, grad_accum, env):
        mode = cfg.reference_mode()
        if not pairs:
            raise ValueError("no preference pairs left after filtering: check the data report")
        model.to(env.device)
        pad_id = tokenizer.eos_token_id
        ref_model = None
        if mode == "precompute":
            precompute_reference(model, pairs + val, cfg.micro_batch_size, pad_id, env.device, cfg.precision)
        elif mode == "copy":
            ref_model = frozen_copy(model)
        batches = EpochBatches(pairs, partial(collate_pairs, pad_id=pad_id), cfg.micro_batch_size, grad_accum,
                               cfg.seed, env.rank, env.world_size)
        loss_fn = make_dpo_loss_fn(mode, cfg.beta, cfg.loss_type, cfg.label_smoothing, ref_model)
        eval_batches = [collate_pairs(val[k:k + cfg.micro_batch_size], pad_id)
                        for k in range(0, len(val), cfg.micro_batch_size)]
        counts = {"train_pairs": len(pairs), "val_pairs": len(val)}
        return batches, with_pair_weight(loss_fn), eval_batches, counts, {
            **counts, "reference": mode, "beta": cfg.beta, "loss_type": cfg.loss_type}

    return finetune("dpo", cfg, model, tokenizer, resume, export, build_pair_examples, setup)
