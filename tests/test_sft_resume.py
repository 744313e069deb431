"""SFT on the shared loop resumes exactly: 2 steps + resume to 4 equals 4 steps straight."""
from __future__ import annotations

import json

import torch

from phikit import build_model, get_config
from phikit.checkpoint import save
from phikit.tokenizer import train_bpe
from phikit.train.sft import SFTConfig, run_sft


def test_resume_continues_where_the_run_stopped(tmp_path):
    words = "red green blue cat dog".split()
    tok = train_bpe([" ".join(words * 3)] * 20, vocab_size=300, whitespace_tokens=False)
    save(build_model(get_config("tiny", vocab_size=320, hidden_size=32, intermediate_size=64,
                                num_attention_heads=1, max_position_embeddings=64), seed=0), tok, tmp_path / "base")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": a},
                                                     {"role": "assistant", "content": f"{a} {b}"}]}) + "\n"
                            for a in words for b in words))

    def sft(out, steps, resume=False):
        cfg = SFTConfig(model=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / out), max_length=48,
                        batch_size=4, micro_batch_size=2, max_steps=steps, lr=1e-2, schedule="constant")
        return run_sft(cfg, resume=resume, export=False)["model"].state_dict()

    straight = sft("straight", 4)
    sft("split", 2)
    resumed = sft("split", 4, resume=True)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-6)
