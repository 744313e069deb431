"""What a run leaves behind for people and machines: metrics.jsonl, TensorBoard logs, loss.png, report.md."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..files import staged_file, write_text_atomic

# Dense peak FLOP/s of common accelerators (bf16/fp16 tensor cores; fp32 is measured instead).
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The MFU denominator: the datasheet peak for known GPUs in half precision, else a measured matmul rate."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak
    n = 1024 if device.type == "cpu" else 8192
    # Its own generator: the run's (dropout) must not move, or a resumed run would diverge from an uninterrupted one.
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype if device.type == "cuda" else torch.float32, generator=gen)
    b = torch.randn(n, n, device=device, dtype=a.dtype, generator=gen)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl (and TensorBoard scalars), on the main process only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop what the interrupted run logged after the checkpoint: those steps are about to be redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "event") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{record.get('event', 'train')}/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_losses(records: list[dict[str, Any]], out: Path, baseline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out loss", lw=1.5)
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, ls="--", color="gray", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with staged_file(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_report(run_dir: Path, summary: dict[str, Any], config: dict[str, Any]) -> Path:
    """report.md: what was trained, on what, how fast, and how well."""
    records = read_metrics(run_dir)
    baseline = summary.get("unigram_loss")
    plot_losses(records, Path(run_dir) / "loss.png", baseline)
    evals = [r for r in records if r.get("event") == "eval"]
    fmt = lambda v, spec=".4f": format(v, spec) if isinstance(v, (int, float)) else "-"
    lines = [
        f"# Training report: {Path(run_dir).name}",
        "",
        f"Model `{config['model']}` ({summary.get('parameters', 0) / 1e6:.1f}M parameters), "
        f"data `{config['data']}`, {summary.get('world_size', 1)} process(es), strategy {summary.get('strategy')}, "
        f"precision {config['precision']}.",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {summary.get('step')} of {config['max_steps']} ({summary.get('status')}) |",
        f"| tokens trained | {summary.get('tokens', 0):,} |",
        f"| final train loss | {fmt(summary.get('loss'))} |",
        f"| held-out loss / bits per byte | {fmt(summary.get('val_loss'))} / {fmt(summary.get('val_bpb'))} |",
        f"| unigram baseline (held-out) | {fmt(baseline)} |",
        f"| tokens/s (whole run, per process) | {fmt(summary.get('tokens_per_s'), ',.0f')} |",
        f"| MFU (vs {fmt(summary.get('peak_flops', 0) / 1e12, '.2f')} TFLOP/s peak) | {fmt(summary.get('mfu'), '.1%')} |",
        f"| skipped steps (NaN/inf) | {summary.get('skipped_steps', 0)} |",
        f"| wall time | {fmt(summary.get('elapsed_s'), '.0f')} s |",
        "",
        "![loss](loss.png)",
        "",
    ]
    if evals:
        lines += ["| step | held-out loss | bits per byte |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['val_loss']:.4f} | {fmt(r.get('val_bpb'))} |" for r in evals]
        lines.append("")
    out = Path(run_dir) / "report.md"
    write_text_atomic(out, "\n".join(lines))
    return out
