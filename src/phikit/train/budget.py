"""Sizing a training run to a time budget: a throughput probe, and the step count it gives, kept for resumes."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..files import write_text_atomic


def planned_steps(plan: Path, measure: Callable[[], int]) -> int:
    """A training run's step count, measured once and kept in the file `plan` (outside the run directory, which
    holds only what training writes): a resumed run must keep its schedule (cosine length, checkpoint spacing),
    which a second throughput probe would change."""
    plan = Path(plan)
    if plan.exists():
        return int(json.loads(plan.read_text())["max_steps"])
    steps = measure()
    plan.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan, json.dumps({"max_steps": steps}) + "\n")
    return steps


def probe_step_seconds(cfg, steps: int = 5) -> float:
    """Seconds per optimizer step of this config on this machine (forward, backward, update on random tokens).
    The fastest of `steps` timed steps: a burst of other work on the machine during the probe only slows some of
    them, and an inflated figure would leave the run with too few steps for its budget (the schedule is fixed)."""
    from ..model import build_model
    from .loop import build_optimizers
    model = build_model(cfg.model_preset(), seed=0).train()
    optimizers = build_optimizers(model, cfg, sharded=False)
    ids = torch.randint(0, model.config.tokenizer_vocab_size or model.config.vocab_size,
                        (cfg.micro_batch_size, cfg.seq_len + 1))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    accum = cfg.global_batch_size // cfg.micro_batch_size
    return min(times[1:]) * accum * 1.1  # the first step is warm-up; 10% for evaluations
