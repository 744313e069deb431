"""SFT on the shared loop resumes exactly: 2 steps + resume to 4 equals 4 steps straight."""
from __future__ import annotations

import json

import pytest
import torch

from phikit import build_model, get_config
from phikit.checkpoint import save
from phikit.tokenizer import train_bpe
from phikit.train.sft import SFTConfig, run_sft


def _tiny_base_and_chats(tmp_path):
    """A tiny model with its own BPE saved under tmp_path/base, and 25 two-word chats."""
    words = "red green blue cat dog".split()
    tok = train_bpe([" ".join(words * 3)] * 20, vocab_size=300, whitespace_tokens=False)
    save(build_model(get_config("tiny", vocab_size=320, hidden_size=32, intermediate_size=64,
                                num_attention_heads=1, max_position_embeddings=64), seed=0), tok, tmp_path / "base")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": a},
                                                     {"role": "assistant", "content": f"{a} {b}"}]}) + "\n"
                            for a in words for b in words))
    return data


def test_resume_continues_where_the_run_stopped(tmp_path):
    data = _tiny_base_and_chats(tmp_path)

    def sft(out, steps, resume=False):
        cfg = SFTConfig(model=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / out), max_length=48,
                        batch_size=4, micro_batch_size=2, max_steps=steps, lr=1e-2, schedule="constant")
        return run_sft(cfg, resume=resume, export=False)["model"].state_dict()

    straight = sft("straight", 4)
    sft("split", 2)
    resumed = sft("split", 4, resume=True)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-6)


def test_lora_with_dropout_is_reproducible_and_resumes_exactly(tmp_path):
    """Same seed, same adapter (peft's lora_A init and the dropout masks come from torch's global generator);
    a resumed run draws the same dropout masks as the straight one (nothing else may consume that generator)."""
    data = _tiny_base_and_chats(tmp_path)

    def sft(out, steps, resume=False):
        torch.manual_seed(len(out) + steps)  # whatever the process's generator holds must not matter
        cfg = SFTConfig(model=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / out), max_length=48,
                        batch_size=4, micro_batch_size=2, max_steps=steps, lr=1e-2, schedule="constant",
                        lora=True, lora_r=2, lora_dropout=0.3)
        return run_sft(cfg, resume=resume, export=False)["model"].state_dict()

    straight = sft("straight", 4)
    sft("split", 2)
    resumed = sft("split", 4, resume=True)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_refused_run_leaves_the_existing_run_untouched(tmp_path):
    from phikit.train.dpo import DPOConfig, run_dpo
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "data_report.json").write_text('{"train": "the first run"}\n')
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    for cfg, fn in ((SFTConfig(model=str(tmp_path / "none"), data=str(data), out_dir=str(run)), run_sft),
                    (DPOConfig(model=str(tmp_path / "none"), data=str(data), out_dir=str(run)), run_dpo)):
        with pytest.raises(ValueError, match="already holds checkpoints: pass --resume"):
            fn(cfg)  # refused before loading anything, so not even the missing model is reached
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "data_report.json"]
    assert (run / "data_report.json").read_text() == '{"train": "the first run"}\n'


def test_cli_exit_code_says_whether_the_run_completed(tmp_path, capsys):
    import argparse

    from phikit.commands.sft import run_finetune
    from phikit.train.loop import TrainingDiverged
    args = argparse.Namespace(model="m", data="d", out_dir=str(tmp_path), resume=False)

    def stopped(cfg, resume):
        return {"status": "stopped by SIGINT", "step": 3}

    def diverged(cfg, resume):
        raise TrainingDiverged("training diverged: lower lr")

    assert run_finetune(args, SFTConfig, stopped) == 130  # Ctrl-C: checkpointed, not exported, not a success
    assert run_finetune(args, SFTConfig, lambda cfg, resume: {"status": "completed"}) == 0
    from phikit.cli import CLIError
    with pytest.raises(CLIError, match="lower lr"):  # printed as one line by the CLI
        run_finetune(args, SFTConfig, diverged)


def test_max_length_beyond_the_model_context_and_negative_lr_are_refused_up_front(tmp_path):
    """Packed rows reach max_length tokens: a max_length over the context used to fail only at the first step,
    with the model's 'shorten the input' instead of the flag to change."""
    from phikit.train.dpo import DPOConfig, run_dpo
    tok = train_bpe(["red green blue"] * 20, vocab_size=300, whitespace_tokens=False)
    save(build_model(get_config("tiny", vocab_size=320, hidden_size=32, intermediate_size=64,
                                num_attention_heads=1, max_position_embeddings=64), seed=0), tok, tmp_path / "base")
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    for cls, fn in ((SFTConfig, run_sft), (DPOConfig, run_dpo)):
        cfg = cls(model=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "run"), max_length=128)
        with pytest.raises(ValueError, match="--max-length 128 exceeds the model's context of 64 tokens: "
                                             "pass --max-length 64 or less"):
            fn(cfg)
        with pytest.raises(ValueError, match="--lr must be > 0"):
            fn(cls(model=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "run"), lr=-1.0))
    assert not (tmp_path / "run").exists()
