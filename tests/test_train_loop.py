"""The training loop: exact resume after SIGKILL, SIGTERM checkpoints, corrupt-checkpoint fallback, NaN guard,
export read by transformers, DDP and FSDP2 against one process, and a small model that learns."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from phikit.train import checkpointing
from phikit.train.config import TrainConfig
from phikit.train.data import Mixture, PretrainBatches
from phikit.train.loop import Trainer, TrainingDiverged
from phikit.train.muon import Muon, bf16_matmul_is_fast
from phikit.train.pretrain import run_pretraining
from phikit.train.report import read_metrics
from train_shards import TINY_MODEL as TINY
from train_shards import motif_shards, textbook_shards
from train_shards import tiny_run_config as _config
from train_shards import train_losses as _losses

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return motif_shards(tmp_path_factory.mktemp("shards"), 600)


def _write_yaml(cfg: TrainConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _trainer(cfg, **kw) -> Trainer:
    from phikit import build_model

    mix = Mixture.from_path(cfg.data)
    batches = kw.pop("batch_fn", None) or PretrainBatches(mix, cfg.seq_len, cfg.global_batch_size,
                                                          cfg.micro_batch_size, seed=cfg.seed)
    return Trainer(build_model(cfg.model_preset(), seed=cfg.seed), cfg, batches, **kw)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """One uninterrupted single-process run: the curve the other runs must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    run_pretraining(_config(shards, out / "run", checkpoint_every=4), export=False)
    return _losses(out / "run")


def test_exact_resume_after_sigkill(shards, reference, tmp_path):
    run = tmp_path / "run"
    cfg = _write_yaml(_config(shards, run, checkpoint_every=4), tmp_path / "c.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "phikit", "train", "--config", str(cfg), "--no-export"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(_losses(run) if (run / "metrics.jsonl").exists() else {}) < 8:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = max(_losses(run))
    assert 8 <= killed_at < 20, "the run must be killed mid-way"
    resumed = run_pretraining(_config(shards, run, checkpoint_every=4), resume=True, export=False)
    assert resumed["status"] == "completed"
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 21))
    for step in range(1, 21):
        assert losses[step] == pytest.approx(reference[step], rel=1e-6), step


def test_sigterm_checkpoints_and_corrupt_fallback(shards, tmp_path):
    cfg = _config(shards, tmp_path / "run", checkpoint_every=2, keep_last=2)
    mix = Mixture.from_path(cfg.data)
    plain = PretrainBatches(mix, cfg.seq_len, cfg.global_batch_size, cfg.micro_batch_size, seed=cfg.seed)

    def batches(step, micro):
        if step == 4 and micro == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step finishes, then a checkpoint
        return plain(step, micro)

    summary = _trainer(cfg, batch_fn=batches).fit()
    assert summary["status"] == "stopped by SIGTERM" and summary["step"] == 5
    ckpts = checkpointing.list_checkpoints(cfg.out_dir)
    assert [p.name for p in ckpts] == ["step-00000005", "step-00000004"]  # keep_last=2 removed step 2
    assert all(checkpointing.verify(p) is None for p in ckpts)
    assert not list((Path(cfg.out_dir) / "checkpoints").glob(".tmp*"))
    # Corrupt the newest: resume warns and takes the older one.
    shard = next(ckpts[0].glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    trainer = _trainer(cfg)
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint .*step-00000005"):
        assert trainer.resume()
    assert trainer.step == 4
    with pytest.raises(ValueError, match="already holds checkpoints"):
        _trainer(cfg).fit(resume=False)


@pytest.fixture(scope="module")
def muon_reference(shards, tmp_path_factory):
    """One uninterrupted single-process run with optimizer: muon."""
    full = _config(shards, tmp_path_factory.mktemp("muon") / "run", optimizer="muon")
    assert run_pretraining(full, export=False)["status"] == "completed"
    return _losses(full.out_dir)


def test_muon_splits_parameters_and_resumes_exactly(shards, muon_reference, tmp_path):
    """optimizer: muon gives the decoder blocks' matrices to Muon and everything else to AdamW; both optimizers'
    state goes into the checkpoint, so a run stopped at step 10 and resumed equals an uninterrupted one."""
    reference = muon_reference
    assert reference[20] < reference[1] - 0.2, "Muon must train the model"

    cfg = _config(shards, tmp_path / "split", optimizer="muon")
    mix = Mixture.from_path(cfg.data)
    plain = PretrainBatches(mix, cfg.seq_len, cfg.global_batch_size, cfg.micro_batch_size, seed=cfg.seed)

    def batches(step, micro):
        if step == 9 and micro == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # step 10 finishes, then a checkpoint
        return plain(step, micro)

    trainer = _trainer(cfg, batch_fn=batches)
    adamw, muon = trainer.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {n for n, p in trainer.model.named_parameters() if id(p) in in_muon}
    expected = {n for n, p in trainer.model.named_parameters() if p.dim() == 2 and ".layers." in n}
    assert names == expected and len(names) == 2 * 6  # q, k, v, dense, fc1, fc2 in each of the 2 blocks
    assert trainer.fit()["step"] == 10
    resumed = run_pretraining(_config(shards, tmp_path / "split", optimizer="muon"), resume=True, export=False)
    assert resumed["status"] == "completed"
    losses = _losses(cfg.out_dir)
    for step in range(1, 21):
        assert losses[step] == pytest.approx(reference[step], rel=1e-6), step


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96)])
def test_muon_matches_torch_muon(shape, monkeypatch):
    """phikit's Muon (fp32 where bf16 is slow, batched by shape) follows torch.optim.Muon's update rule: run both in
    bf16 arithmetic for a few steps on the same weights and gradients and compare; and in fp32 the iteration
    moves the singular values of the update toward 1 (it orthogonalizes)."""
    import phikit.train.muon as muon_module
    from phikit.train.muon import Muon, orthogonalize
    monkeypatch.setattr(muon_module, "bf16_matmul_is_fast", lambda device: True)  # torch's always iterates in bf16
    gen = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for _ in range(2)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = Muon(ours, lr=0.02, weight_decay=0.1)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn(*shape, generator=gen) for _ in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3)
    sv = torch.linalg.svdvals(orthogonalize(torch.randn(3, *shape, generator=gen), dtype=torch.float32))
    assert sv.max() < 1.3 and 0.7 < sv.mean() < 1.2  # Newton-Schulz's quintic lands singular values near 1


def test_muon_refuses_fsdp():
    with pytest.raises(ValueError, match="optimizer muon needs whole matrices"):
        TrainConfig(model="tiny", data="x", optimizer="muon", strategy="fsdp").validate()
    with pytest.raises(ValueError, match="optimizer 'sgd' is unknown"):
        TrainConfig(model="tiny", data="x", optimizer="sgd").validate()


def test_nan_guard_skips_then_stops(shards, tmp_path):
    cfg = _config(shards, tmp_path / "run", max_steps=6, max_bad_steps=2, grad_clip=0.0)
    from phikit.train.losses import causal_lm_loss

    def flaky(model, batch):
        loss, metrics = causal_lm_loss(model, batch)
        return (loss * float("nan") if flaky.step_is_bad else loss), metrics

    flaky.step_is_bad = False
    trainer = _trainer(cfg, loss_fn=flaky)
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    flaky.step_is_bad = True
    record = trainer.train_step()
    assert record.get("skipped") and trainer.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # no update happened
    flaky.step_is_bad = False
    assert not trainer.train_step().get("skipped") and trainer.bad_streak == 0
    flaky.step_is_bad = True
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        for _ in range(3):
            trainer.train_step()


def test_export_loads_in_transformers(shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = _config(shards, tmp_path / "run", max_steps=3)
    trainer = _trainer(cfg)
    trainer.fit()
    out = checkpointing.export_checkpoint(tmp_path / "run", tmp_path / "hf")
    hf = transformers.PhiForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 100, (2, 20))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, trainer.model(ids).logits, atol=1e-5)


def test_exported_model_names_the_data_eos(shards, tmp_path):
    """A preset says eos 50256 (phi's); the exported model must name the eos of the tokenizer it was trained on,
    which transformers' generate stops at."""
    run_pretraining(_config(shards, tmp_path / "run", max_steps=1, warmup_steps=0))
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    generation = json.loads((tmp_path / "run" / "model" / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == generation["eos_token_id"] == 0  # the shards' eos


def _torchrun(cfg_path: Path, nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "phikit", "train", "--config", str(cfg_path), "--no-export"]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(shards, reference, tmp_path, strategy):
    """2 gloo processes (DDP, or FSDP2 sharding) follow the 1-process loss curve for the same global batch."""
    cfg = _config(shards, tmp_path / "run", strategy=strategy, checkpoint_every=10)
    _torchrun(_write_yaml(cfg, tmp_path / "c.yaml"))
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 21))
    for step in range(1, 21):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step


def test_muon_under_ddp_matches_one_process(shards, muon_reference, tmp_path):
    """Muon sees the all-reduced gradients, so 2 DDP processes follow the 1-process Muon curve."""
    cfg = _config(shards, tmp_path / "run", strategy="ddp", optimizer="muon", checkpoint_every=10)
    _torchrun(_write_yaml(cfg, tmp_path / "c.yaml"))
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 21))
    # Where bf16 products are native, Newton-Schulz runs in bf16 and rounds away the last bits in which the
    # all-reduced gradient differs from the one-process sum (measured: at most 3.5e-5 over 20 steps).
    tolerance = 2e-4 if bf16_matmul_is_fast(torch.device("cpu")) else 1e-5
    for step in range(1, 21):
        assert losses[step] == pytest.approx(muon_reference[step], rel=tolerance), step


def test_small_model_learns_textbooks(tmp_path_factory):
    """Held-out loss on the procedural textbook corpus falls far below the unigram baseline within seconds."""
    data = textbook_shards(tmp_path_factory.mktemp("textbooks"), n_train=400, n_val=40, vocab_size=384)
    run = tmp_path_factory.mktemp("learn") / "run"
    cfg = TrainConfig(model="tiny", model_config={"vocab_size": 512}, data=str(data), seq_len=128,
                      global_batch_size=16, micro_batch_size=16, max_steps=60, lr=3e-3, schedule="cosine",
                      warmup_steps=5, eval_every=30, eval_sequences=16, checkpoint_every=0, out_dir=str(run)).validate()
    summary = run_pretraining(cfg)
    assert summary["val_loss"] < 0.6 * summary["unigram_loss"], summary
    assert 0 < summary["val_bpb"] < 2.5
    evals = [r for r in read_metrics(run) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [30, 60] and evals[1]["val_loss"] < evals[0]["val_loss"]
    for name in ("report.md", "loss.png", "metrics.jsonl", "config.yaml", "summary.json", "model/config.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "held-out loss" in (run / "report.md").read_text()


def test_peak_flops_measurement_leaves_the_run_rng_alone():
    """fit() measures the matmul peak after a resume restored the RNG: it must not draw from it (dropout)."""
    from phikit.train.report import matmul_peak_flops
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert matmul_peak_flops(torch.device("cpu")) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_resume_without_checkpoints_says_it_starts_a_new_run(shards, tmp_path, capsys):
    summary = run_pretraining(_config(shards, tmp_path / "run", max_steps=3), resume=True, export=False)
    assert summary["status"] == "completed"
    assert "yet: starting a new run" in capsys.readouterr().out


def test_dropout_runs_repeat_with_their_seed(shards, tmp_path):
    """Dropout masks come from the run's seed, not from whatever state the process's generator was left in."""
    runs = []
    for name, process_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(process_seed)
        cfg = _config(shards, tmp_path / name, max_steps=4, model_config={**TINY, "resid_pdrop": 0.2})
        run_pretraining(cfg, export=False)
        runs.append(_losses(tmp_path / name))
    assert runs[0] == runs[1]
