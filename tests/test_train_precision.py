"""Mixed-precision pretraining (bf16 autocast; fp16 autocast with dynamic loss scaling) on the CPU, and on CUDA
where there is a GPU: it starts where fp32 starts, learns, and resumes from a checkpoint exactly (the loss
scaler's state included)."""
from __future__ import annotations

import functools
import math
import shutil

import pytest
import torch

from phikit.train import checkpointing
from phikit.train.config import TrainConfig
from phikit.train.pretrain import run_pretraining
from phikit.train.report import read_metrics
from train_shards import motif_shards, tiny_run_config
from train_shards import train_losses as _losses

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STEPS = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return motif_shards(tmp_path_factory.mktemp("shards"), 300)


def _config(shards, out_dir, **kw) -> TrainConfig:
    return tiny_run_config(shards, out_dir, **{"micro_batch_size": 4, "max_steps": STEPS, "checkpoint_every": 8,
                                                **kw})


def _loss_scales(run_dir) -> dict[int, float]:
    return {r["step"]: r.get("loss_scale") for r in read_metrics(run_dir) if r["event"] == "train"}


@pytest.fixture(scope="module")
def fp32_losses(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "run"
    run_pretraining(_config(shards, out, checkpoint_every=0), export=False)
    return _losses(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_learns_and_resumes_exactly(shards, fp32_losses, tmp_path, device, precision, monkeypatch):
    # The loss scale doubles every 2 clean steps and halves on an overflow, so within this short run it moves
    # both ways, and a resume that lost the scaler's state would follow another path.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=2))
    run = tmp_path / "run"
    summary = run_pretraining(_config(shards, run, precision=precision, device=device), export=False)
    assert summary["status"] == "completed"
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    # The same weights and batch: the first loss differs from fp32's by the rounding of half precision only.
    assert losses[1] == pytest.approx(fp32_losses[1], rel=0.02)
    assert losses != fp32_losses, "half precision changed nothing: autocast did not run"
    assert losses[STEPS] < losses[1] - 0.3
    assert losses[STEPS] == pytest.approx(fp32_losses[STEPS], rel=0.05)

    # Resume from the middle checkpoint: the same curve as the uninterrupted run, step for step.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(checkpointing.checkpoint_dir(resumed, STEPS))
    again = run_pretraining(_config(shards, resumed, precision=precision, device=device), resume=True,
                            export=False)
    assert again["status"] == "completed"
    after = _losses(resumed)
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert after[step] == pytest.approx(losses[step], rel=1e-6), step
    assert _loss_scales(resumed) == _loss_scales(run)
    if precision == "fp16":
        scales = list(_loss_scales(run).values())
        assert any(b > a for a, b in zip(scales, scales[1:])) and any(b < a for a, b in zip(scales, scales[1:]))
