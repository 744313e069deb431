"""LoRA via peft on phikit's modules: merged weights equal base + adapter, only adapter weights train, and the
saved adapter loads onto transformers' PhiForCausalLM (peft's own loader) with the same logits."""
from __future__ import annotations

import json
import random

import pytest
import torch

from phikit import build_model, get_config
from phikit.checkpoint import load, save
from phikit.tokenizer import train_bpe
from phikit.train.lora import LORA_TARGETS, apply_lora, load_adapter, merge_adapter, save_adapter

CONFIG = dict(vocab_size=384, hidden_size=64, intermediate_size=256, num_attention_heads=2,
              max_position_embeddings=64)


def randomize_adapter(model, seed=0):
    """peft starts lora_B at zero (a no-op adapter); give it weights so the test can see it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_adapter_targets_and_merge_equal_base_plus_adapter():
    model = build_model(get_config("tiny", **CONFIG), seed=0)
    lora = apply_lora(model, r=4, alpha=8, dropout=0.0)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if ".lora_A" in n}
    assert adapted == set(LORA_TARGETS)
    randomize_adapter(lora)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        with_adapter = lora(ids).logits
        with lora.disable_adapter():
            base = lora(ids).logits
        merged = merge_adapter(lora)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids).logits, with_adapter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_adapter, base)


def test_only_adapter_weights_change_during_sft(tmp_path):
    from phikit.train.sft import SFTConfig, run_sft
    rng = random.Random(0)
    words = "alpha beta gamma delta".split()
    tok = train_bpe([" ".join(rng.choices(words, k=20)) for _ in range(50)], vocab_size=300,
                    whitespace_tokens=False)
    base = build_model(get_config("tiny", **CONFIG), seed=0)
    save(base, tok, tmp_path / "base")
    before = {k: v.clone() for k, v in load(tmp_path / "base")[0].state_dict().items()}
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": w},
                                                     {"role": "assistant", "content": w + " " + w}]}) + "\n"
                            for w in words * 4))
    cfg = SFTConfig(model=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "run"), max_length=32,
                    batch_size=4, micro_batch_size=4, max_steps=3, lr=1e-2, lora=True, lora_r=2, lora_dropout=0.0)
    result = run_sft(cfg)
    lora_model = result["model"]
    trained = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "token_adapter" in n for n in trained)
    base_now = {k.replace("base_model.model.", "").replace(".token_adapter", "").replace(".base_layer", ""): v
                for k, v in lora_model.state_dict().items() if "lora_" not in k and "tokens_delta" not in k}
    assert set(base_now) == set(before)
    n_rows = len(tok)  # rows below the new ChatML ids are untouched; the ChatML rows were added, then trained
    for name, value in before.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            torch.testing.assert_close(base_now[name][:n_rows], value[:n_rows], rtol=0, atol=0)
        else:
            torch.testing.assert_close(base_now[name], value, rtol=0, atol=0)
    assert any(torch.count_nonzero(p) for n, p in lora_model.named_parameters() if "lora_B" in n)
    # The run wrote the adapter in peft's format and the merged model; `phikit merge` rebuilds the same model.
    adapter_dir = tmp_path / "run" / "adapter"
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    from phikit.cli import main
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(adapter_dir),
                 "--out", str(tmp_path / "merged")]) == 0
    ids = torch.tensor([tok.encode("<|im_start|>user\nalpha<|im_end|>\n<|im_start|>assistant\n")])
    merged_cli, merged_tok = load(tmp_path / "merged")
    merged_run, _ = load(tmp_path / "run" / "model")
    assert merged_tok.has_chatml
    with torch.no_grad():
        expected = lora_model.eval()(ids).logits
        torch.testing.assert_close(merged_cli(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged_run(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_saved_adapter_loads_onto_transformers_phi_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    tok = train_bpe(["one two three four five six"] * 20, vocab_size=300, whitespace_tokens=False)
    model = build_model(get_config("tiny", **CONFIG), seed=1)
    save(model, tok, tmp_path / "base")
    lora = apply_lora(load(tmp_path / "base")[0], r=4, alpha=16, dropout=0.0)
    randomize_adapter(lora, seed=3)
    save_adapter(lora, tmp_path / "adapter")
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path / "base").eval()
    hf_lora = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ours = load_adapter(load(tmp_path / "base")[0], tmp_path / "adapter").eval()
    ids = torch.randint(0, 290, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_lora(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(ids).logits, lora(ids).logits, rtol=1e-6, atol=1e-6)


def test_bad_lora_settings_are_named():
    model = build_model(get_config("tiny", **CONFIG), seed=0)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(model, targets=["q_proj", "Wqkv"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, "/nonexistent/adapter")


def test_merge_refuses_an_output_that_would_delete_its_inputs_or_a_run(tmp_path, capsys):
    from phikit.cli import main
    run = tmp_path / "sft"
    for sub in ("adapter", "checkpoints/step-00000001", "model"):
        (run / sub).mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "model" / "config.json").write_text("{}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out in (run, run / "adapter", run / "model"):  # the run dir would go whole, checkpoints and all
        assert main(["merge", "--model", str(run / "model"), "--adapter", str(run / "adapter"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "choose another output directory" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert main(["merge", "--model", str(run / "model"), "--adapter", str(run / "adapter"), "--out", str(other)]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "notes" not in str(p)) == before


def test_sft_adapter_with_chatml_rows_merges_in_transformers_as_in_phikit(tmp_path):
    # ChatML took padding rows whose lm_head bias phikit reset to the mean; the adapter carries the rows' weights
    # but no bias, so transformers + peft merged the adapter onto the base's own bias and gave other logits.
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from phikit.train.sft import SFTConfig, run_sft
    words = "alpha beta gamma delta".split()
    tok = train_bpe([" ".join(random.Random(0).choices(words, k=20)) for _ in range(50)], vocab_size=300,
                    whitespace_tokens=False)
    base = build_model(get_config("tiny", **CONFIG), seed=0)
    with torch.no_grad():  # a real phi's lm_head bias is not zero
        base.lm_head.bias.copy_(torch.randn(base.lm_head.bias.shape, generator=torch.Generator().manual_seed(0)))
    save(base, tok, tmp_path / "base")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": w},
                                                     {"role": "assistant", "content": w}]}) + "\n" for w in words))
    run_sft(SFTConfig(model=str(tmp_path / "base"), data=str(data), out_dir=str(tmp_path / "run"), max_length=32,
                      batch_size=4, micro_batch_size=4, max_steps=1, lr=1e-2, lora=True, lora_r=2, lora_dropout=0.0))
    merged, merged_tok = load(tmp_path / "run" / "model")
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path / "base").eval()
    hf_merged = peft.PeftModel.from_pretrained(hf, str(tmp_path / "run" / "adapter")).merge_and_unload().eval()
    ids = torch.tensor([merged_tok.encode("<|im_start|>user\nalpha<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, hf_merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_peft_causal_lm_adapter_from_transformers_loads_and_merges_in_phikit(tmp_path):
    # peft's CAUSAL_LM wrapper (what adapters trained on transformers usually declare) needs transformers'
    # generation methods: load_adapter and `phikit merge` stopped with an AttributeError.
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from phikit.cli import main
    tok = train_bpe(["one two three four five six"] * 20, vocab_size=300, whitespace_tokens=False)
    save(build_model(get_config("tiny", **CONFIG), seed=1), tok, tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                             task_type="CAUSAL_LM")
    hf_lora = peft.get_peft_model(transformers.PhiForCausalLM.from_pretrained(tmp_path / "base"), config).eval()
    randomize_adapter(hf_lora, seed=2)
    hf_lora.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 290, (2, 10))
    ours = load_adapter(load(tmp_path / "base")[0], tmp_path / "adapter").eval()
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        expected = hf_lora(input_ids=ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
        ours.merge_adapter()  # merge and unmerge in place round-trip
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load(tmp_path / "merged")[0](ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_trained_token_rows_keep_the_lm_head_bias(tmp_path):
    """peft multiplies trainable lm_head rows without the layer's bias; the adapted model must compute with it, so
    that what trains is what merges and exports (phi's lm_head has a bias), also after saving and loading."""
    def base_model():
        model = build_model(get_config("tiny", **CONFIG), seed=0).eval()
        with torch.no_grad():
            model.lm_head.bias.copy_(torch.randn(model.lm_head.bias.shape, generator=torch.Generator().manual_seed(1)))
        return model

    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        base = base_model()(ids).logits
        lora = apply_lora(base_model(), r=4, alpha=8, dropout=0.0, train_token_ids=[380, 381]).eval()
        torch.testing.assert_close(lora(input_ids=ids).logits, base)  # a fresh adapter changes nothing
        randomize_adapter(lora)
        for name, p in lora.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape) * 0.1)  # the new rows, as training would move them
        adapted = lora(input_ids=ids).logits
        save_adapter(lora, tmp_path / "adapter")
        reloaded = load_adapter(base_model(), tmp_path / "adapter").eval()(input_ids=ids).logits
        merged = merge_adapter(lora)(ids).logits
    torch.testing.assert_close(adapted, merged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reloaded, merged, atol=1e-4, rtol=1e-4)
