"""Training config, shard data, schedules and the fused loss: fast checks, no training runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phikit import build_model, get_config
from phikit.cli import main as cli_main
from phikit.train.config import TrainConfig, load_config
from phikit.train.data import (Mixture, PretrainBatches, ShardSet, heldout_batches, token_byte_lengths,
                               unigram_loss)
from phikit.train.loop import lr_at
from phikit.train.losses import causal_lm_loss, fused_causal_lm_loss
from train_shards import write_shards

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _docs(n, vocab, seed, length=(5, 40)):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, rng.integers(*length)).tolist() for _ in range(n)]


@pytest.fixture
def two_sources(tmp_path):
    a = write_shards(tmp_path / "a", _docs(200, 100, 0), _docs(20, 100, 1), 100, 0, shard_tokens=1000)
    b = write_shards(tmp_path / "b", _docs(200, 100, 2), _docs(20, 100, 3), 100, 0, shard_tokens=700)
    spec = tmp_path / "mix.yaml"
    spec.write_text("sources:\n  - {path: a, weight: 0.8}\n  - {path: b, weight: 0.2}\n")
    return spec


# --- config ---
def test_config_overrides_are_typed_and_unknown_keys_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\ndata: x\nlr: 1e-3\nmax_steps: 10\n")
    cfg = load_config(path, ["lr=2e-4", "precision=bf16", "betas=[0.9, 0.95]", "model_config.num_hidden_layers=1",
                             "compile=false"])
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float) and cfg.betas == [0.9, 0.95] and cfg.compile is False
    assert cfg.model_preset().num_hidden_layers == 1
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        load_config(path, ["learning_rate=1"])
    with pytest.raises(ValueError, match="did you mean 'max_steps'"):
        load_config(path, ["max_step=3"])
    with pytest.raises(ValueError, match="model_config.hidden"):
        load_config(path, ["model_config.hidden=3"])
    with pytest.raises(ValueError, match="expects int"):
        load_config(path, ["max_steps=1.5"])


def test_paper_recipe_config_matches_design():
    cfg = load_config(CONFIGS / "phi-1_5-paper.yaml", ["data=x"])
    assert (cfg.betas, cfg.eps, cfg.weight_decay, cfg.lr) == ([0.9, 0.98], 1e-7, 0.1, 2e-4)
    assert (cfg.schedule, cfg.warmup_steps, cfg.precision) == ("constant", 0, "fp16")
    assert (cfg.global_batch_size, cfg.seq_len) == (2048, 2048)
    assert cfg.model_preset().num_parameters() == 1_418_270_720
    assert cfg.grad_accum(world_size=8) * cfg.micro_batch_size * 8 == 2048
    assert load_config(CONFIGS / "phi-2.yaml", ["data=x"]).model_preset().num_parameters() == 2_779_683_840


def test_batch_split_must_divide():
    cfg = TrainConfig(data="x", global_batch_size=12, micro_batch_size=4)
    assert cfg.grad_accum(3) == 1
    with pytest.raises(ValueError, match="not a multiple"):
        cfg.grad_accum(2)


def test_schedules():
    const = TrainConfig(data="x", lr=1.0, max_steps=100)
    assert all(lr_at(s, const) == 1.0 for s in (0, 50, 99))  # the paper: constant, no warm-up
    cos = TrainConfig(data="x", lr=1.0, max_steps=100, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(10, cos) == pytest.approx(1.0) and lr_at(100, cos) == pytest.approx(0.1)
    assert lr_at(55, cos) == pytest.approx(0.55)
    wsd = TrainConfig(data="x", lr=1.0, max_steps=100, schedule="wsd", warmup_steps=5, decay_fraction=0.2,
                      min_lr_ratio=0.0)
    assert lr_at(79, wsd) == 1.0 and lr_at(99, wsd) == pytest.approx(0.0) and lr_at(89, wsd) == pytest.approx(0.5)


# --- data ---
def test_shards_read_across_files_and_verify(tmp_path):
    docs = _docs(50, 300, 0)
    d = write_shards(tmp_path / "s", docs, _docs(5, 300, 1), 300, 0, shard_tokens=97)
    shards = ShardSet(d)
    stream = np.array([t for doc in docs for t in [*doc, 0]])
    assert shards.num_tokens("train") == len(stream)
    assert np.array_equal(shards.read("train", 90, 250), stream[90:340])
    assert shards.verify() == []
    (d / "train-00001.bin").write_bytes(b"\x01\x00" * 97)  # same size, different content
    assert shards.verify() == ["train-00001.bin"]


def test_batches_deterministic_and_same_over_processes(two_sources):
    mix = Mixture.from_path(two_sources)
    assert mix.weights.tolist() == pytest.approx([0.8, 0.2])
    one = PretrainBatches(mix, 16, 8, 2, seed=3)
    again = PretrainBatches(mix, 16, 8, 2, seed=3)
    full = torch.cat([one(5, m)["input_ids"] for m in range(4)])
    assert torch.equal(full, torch.cat([again(5, m)["input_ids"] for m in range(4)]))
    split = [PretrainBatches(mix, 16, 8, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    assert torch.equal(full, torch.cat([split[r](5, m)["input_ids"] for r in range(2) for m in range(2)]))
    assert not torch.equal(full, torch.cat([one(6, m)["input_ids"] for m in range(4)]))
    # The weights show in which source rows come from (source b's windows start past its own lengths).
    picks = np.concatenate([[s for s, _ in one.windows(step)] for step in range(200)])
    assert abs((picks == 0).mean() - 0.8) < 0.03


def test_document_masking_segments(tmp_path):
    d = write_shards(tmp_path / "s", [[5, 6], [7, 8, 9]], [[5, 6]], 10, 0)
    batch = PretrainBatches(Mixture.from_path(d), 7, 1, 1, document_masking=True)(0, 0)
    assert batch["input_ids"].tolist() == [[5, 6, 0, 7, 8, 9, 0]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1]]


def test_bits_per_byte_table_matches_tokenizer_decode(phi_tokenizer, tmp_path):
    phi_tokenizer.save(tmp_path)
    lengths = token_byte_lengths(tmp_path / "tokenizer.json", 51200)
    text = "def f(x):\n        return x  # café ünïcode → ok\n\t\tdone"
    ids = phi_tokenizer.encode(text) + [phi_tokenizer.eos_token_id]
    assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert lengths[50256] == 0 and lengths[51000] == 0


def test_unigram_baseline(two_sources):
    mix = Mixture.from_path(two_sources)
    held = heldout_batches(mix, 16, 8, 4)
    assert len(held) == 2 and held[0]["input_ids"].shape == (4, 16)
    # Uniform random tokens over ~99 ids: the unigram cross-entropy is close to log(99).
    assert abs(unigram_loss(mix, held) - math.log(99)) < 0.5


def test_bad_inputs_fail_in_one_line_before_compute(tmp_path, two_sources, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: tiny\ndata: {two_sources}\nmax_steps: 2\nout_dir: {tmp_path / 'run'}\n")
    cases = [
        (["bogus_key=1"], "unknown config key 'bogus_key'"),
        (["global_batch_size=10", "micro_batch_size=4"], "not a multiple"),
        ([f"data={tmp_path / 'nowhere'}"], "not found"),
        (["model_config.vocab_size=64"], "larger than the model's embedding"),
        (["lr=-1e-3"], "lr must be > 0, got -0.001"),
        (["log_every=0"], "log_every must be at least 1"),  # was a ZeroDivisionError traceback mid-run
        (["device=tpu"], "device 'tpu' is unknown"),  # was silently the CPU
        (["eps=0"], "eps must be > 0"),  # Adam's 0/0 on zero gradients: NaN weights, then a "completed" run
        (["seq_len=1"], "seq_len must be at least 2"),  # no token to predict: loss 0
        (["eval_every=-1"], "eval_every must be >= 0"),  # step % -1 == 0: evaluated every step
        (["checkpoint_every=-5"], "checkpoint_every must be >= 0"),
        (["grad_clip=-1"], "grad_clip must be >= 0"),
        (["weight_decay=-0.1"], "weight_decay must be >= 0"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append(([f"data={tmp_path / 'empty'}"], "index.json missing"))
    for overrides, message in cases:
        assert cli_main(["train", "--config", str(cfg), *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing ran


# --- loss ---
def test_fused_loss_matches_model_loss_and_gradients():
    model = build_model(get_config("tiny", vocab_size=300, hidden_size=64, intermediate_size=256), seed=0)
    ids = torch.randint(0, 300, (3, 50))
    labels = ids.clone()
    labels[0, :20] = -100
    batch = {"input_ids": ids, "labels": labels}
    grads = []
    for fn in (causal_lm_loss, fused_causal_lm_loss, None):
        model.zero_grad()
        loss = model(ids, labels=labels).loss if fn is None else fn(model, batch)[0]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, g in grads[:2]:
        assert torch.allclose(loss, grads[2][0], rtol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, grads[2][1]))
    with torch.no_grad():  # evaluation computes no gradients
        assert torch.allclose(fused_causal_lm_loss(model, batch)[0], grads[2][0], rtol=1e-6)
    ref = F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1))
    assert torch.allclose(ref, grads[2][0], rtol=1e-6)


def test_export_refuses_to_replace_the_run_it_reads(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    assert cli_main(["train", "--export", str(run), str(run)]) == 2
    assert "would delete it" in capsys.readouterr().err and (run / "checkpoints" / "step-00000002").is_dir()


def test_resume_with_only_corrupt_checkpoints_says_so(tmp_path):
    from phikit.train.loop import Trainer
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)  # no manifest: an interrupted write
    cfg = TrainConfig(data="x", seq_len=8, global_batch_size=1, micro_batch_size=1, max_steps=1, device="cpu",
                      tensorboard=False)
    trainer = Trainer(build_model(get_config("tiny", vocab_size=64), seed=0), cfg, lambda step, micro: {},
                      run_dir=tmp_path)
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        with pytest.raises(ValueError, match="nothing to resume from"):  # not "pass --resume": it was passed
            trainer.fit(resume=True)


def test_model_config_values_are_typed_and_bad_yaml_is_named(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\ndata: x\nmodel_config: {num_hidden_layers: '3'}\n")
    cfg = load_config(path, ["model_config.layer_norm_eps=1e-6"])
    assert cfg.model_config == {"num_hidden_layers": 3, "layer_norm_eps": 1e-6}
    for bad in ("model_config.num_hidden_layers=abc", "model_config.num_hidden_layers=2.5"):
        with pytest.raises(ValueError, match="'model_config.num_hidden_layers' expects int"):
            load_config(path, [bad])
    path.write_text("model: tiny\nlr: [1\n")
    assert cli_main(["train", "--config", str(path), "data=x"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3: not valid YAML" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
