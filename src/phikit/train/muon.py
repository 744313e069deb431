"""Muon: momentum orthogonalized by a Newton-Schulz iteration, for the 2-D weights inside the decoder blocks.

The update rule is torch.optim.Muon's (Nesterov momentum, its quintic Newton-Schulz coefficients, the "original"
shape-dependent learning-rate scaling, decoupled weight decay), with two changes for speed on small models:
  - the iteration runs in fp32 where bf16 matrix products are slow (CPUs without AVX512-BF16/AMX, which is most
    laptops), and in bf16 elsewhere, as torch's does;
  - matrices of the same shape are orthogonalized together in one batched product, not one at a time.
On the speedrun's 4 x 192 model on a 2-core CPU the whole optimizer step costs a fraction of torch.optim.Muon's
(benchmarks in docs/training.md). The state (`momentum_buffer` per parameter) has torch's layout.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # the quintic of torch.optim.Muon (steepest slope at zero)


@functools.cache  # asked on every step: the answer for a device never changes
def bf16_matmul_is_fast(device: torch.device) -> bool:
    """bf16 matrix products beat fp32 on GPUs and on CPUs with bf16 units; elsewhere they are emulated."""
    if device.type != "cpu":
        return True
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def orthogonalize(updates: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """Approximately U V^T of each matrix U S V^T in a (batch, rows, cols) stack, by Newton-Schulz iteration."""
    a, b, c = NS_COEFFICIENTS
    dtype = dtype or (torch.bfloat16 if bf16_matmul_is_fast(updates.device) else torch.float32)
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(updates.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters; give embeddings, the output head and vectors to AdamW (see build_optimizers)."""

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"Muon needs lr > 0, 0 <= momentum < 1, weight_decay >= 0; got lr={lr}, "
                             f"momentum={momentum}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        eps=eps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weights only, got a parameter of shape {tuple(p.shape)}: "
                                     "give it to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[(tuple(p.shape), p.device, p.dtype)].append(p)
            for (shape, _, _), params in by_shape.items():
                grads = torch.stack([p.grad for p in params])
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_lerp_(bufs, list(grads.unbind(0)), 1 - group["momentum"])
                momentum = torch.stack(bufs)
                update = grads.lerp(momentum, group["momentum"]) if group["nesterov"] else momentum
                update = orthogonalize(update, group["ns_steps"], group["eps"])
                scale = math.sqrt(max(1.0, shape[0] / shape[1]))  # torch's "original" adjustment
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, list(update.unbind(0)), alpha=-group["lr"] * scale)
        return loss
