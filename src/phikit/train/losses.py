"""Loss functions for the training loop: `loss_fn(model, batch) -> (loss, metrics)`.

`loss` is a mean over `metrics["loss_weight"]` units (predicted tokens here); the loop weights micro-batches
and processes by it, so a step's loss is the exact mean over every predicted token of the global batch.

`fused_causal_lm_loss` is the same next-token cross-entropy computed without materializing the [tokens, vocab]
logits: the lm_head matmul, log-sum-exp and the gradient (softmax - one_hot) run chunk by chunk in forward, so
the logits never leave the cache and the separate log-softmax backward disappears.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    # Packed rows (SFT) carry segment and position ids, padded rows an attention mask; the rest are None.
    return {"input_ids": batch["input_ids"],
            **{k: batch.get(k) for k in ("attention_mask", "position_ids", "segment_ids")}}


def _targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # transformers' convention: labels align with input_ids; position t predicts labels[t + 1].
    return batch["labels"][:, 1:].reshape(-1)


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over labels != -100 (SFT: the assistant tokens), from the full logits."""
    out = model(**_inputs(batch))
    targets = _targets(batch)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    count = (targets != IGNORE_INDEX).sum()
    loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / count.clamp(min=1)
    return loss, {"loss_weight": count}


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ W^T + b, target), gradients computed chunk-wise during forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, need_grad: bool):
        compute = hidden.dtype
        w = weight.to(compute)
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[i:i + chunk_size], targets[i:i + chunk_size]
            valid = t != IGNORE_INDEX
            t = t.clamp(min=0)
            logits = torch.addmm(bias.to(compute), h, w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            if need_grad:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                grad.mul_(valid[:, None])
                grad_c = grad.to(compute)
                grad_h[i:i + chunk_size] = grad_c @ w
                if compute == torch.float32:
                    grad_w.addmm_(grad_c.t(), h)
                else:  # accumulate the weight gradient in fp32 across chunks
                    grad_w += (grad_c.t() @ h).float()
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), (grad_w * grad_out).to(ctx.dtypes[0]),
                (grad_b * grad_out).to(ctx.dtypes[1]), None, None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             targets: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """Summed CE of (hidden @ weight^T + bias) against targets (-100 ignored), never holding all logits."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    # Gradients are computed during forward, so only when a backward can follow.
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, weight, bias))
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, need_grad)


def fused_causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """causal_lm_loss with the lm_head and cross-entropy fused chunk-wise (same value, less memory traffic)."""
    inner = getattr(model, "module", model)  # DDP keeps the model in .module
    out = model(**_inputs(batch), output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1].reshape(-1, inner.config.hidden_size)
    targets = _targets(batch)
    count = (targets != IGNORE_INDEX).sum()
    head = inner.get_output_embeddings()
    total = linear_cross_entropy_sum(hidden, head.weight, head.bias, targets)
    return total / count.clamp(min=1), {"loss_weight": count}
