"""End to end on the CPU: a tiny model pretrained here for seconds is SFT-tuned on generated conversations (it
must answer in ChatML and stop at <|im_end|> on held-out prompts), exported, read back by transformers, and then
DPO-tuned to prefer correct arithmetic answers on held-out pairs."""
from __future__ import annotations

import json
import random

import pytest
import torch

from phikit import build_model, get_config
from phikit.checkpoint import load, save
from phikit.tokenizer import IM_END, train_bpe
from phikit.train.chat_data import render_chatml, tokenize_conversation
from phikit.train.dpo import (DPOConfig, build_pair_examples, precompute_reference, preference_accuracy,
                              reward_accuracy, run_dpo)
from phikit.train.sft import SFTConfig, run_sft

COLORS = "red blue green yellow black white pink brown gray orange".split()
THINGS = "cat dog bird fish car tree house ball book cup hat shoe boat lamp door key".split()
SYSTEM = "You are a helpful assistant."


def sentence(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.4:
        return f"The {rng.choice(THINGS)} is {rng.choice(COLORS)}."
    if k < 0.7:
        return " ".join(rng.choice(THINGS) for _ in range(rng.randint(2, 5))) + "."
    return f"I see {rng.randint(0, 9)} {rng.choice(THINGS)}s."


def conversation(rng: random.Random) -> list[dict]:
    """Three instruction kinds, with and without a system prompt, sometimes two turns. Counting teaches the
    format of a bare-number answer (a digit, then <|im_end|>), not arithmetic."""
    def turn():
        kind = rng.random()
        if kind < 0.35:
            words = [rng.choice(THINGS) for _ in range(rng.randint(1, 4))]
            return "Repeat the words: " + " ".join(words), " ".join(words)
        if kind < 0.7:
            thing, color = rng.choice(THINGS), rng.choice(COLORS)
            return f"What color is the {thing}?", f"The {thing} is {color}."
        words = [rng.choice(THINGS) for _ in range(rng.randint(1, 9))]
        return f"How many words: {' '.join(words)}?", str(len(words))
    msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(1 if rng.random() < 0.8 else 2):
        q, a = turn()
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def as_sharegpt(msgs: list[dict]) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in msgs]}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads; spare the other tests' cores
    yield tmp_path_factory.mktemp("e2e")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(work):
    """A tiny phi model pretrained for a few seconds on generated sentences, saved with phikit.save."""
    rng = random.Random(0)
    corpus = [" ".join(sentence(rng) for _ in range(6)) for _ in range(1000)]
    tok = train_bpe(corpus + ["What is 3 + 4? Repeat the words: You are a helpful assistant."], vocab_size=400,
                    whitespace_tokens=False)
    # 512 rows for ~400 tokens: ChatML goes into padding rows, as with phi's 51200 rows for 50295 tokens.
    config = get_config("tiny", vocab_size=512, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                        max_position_embeddings=128, tokenizer_vocab_size=len(tok))
    model = build_model(config, seed=0)
    flat = torch.tensor([i for text in corpus for i in tok.encode(text) + [tok.eos_token_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, len(flat) - 65, (16,), generator=g)
        x = torch.stack([flat[s:s + 64] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save(model, tok, work / "base")


@pytest.fixture(scope="module")
def sft(work, base_dir):
    rng = random.Random(1)
    records = []
    for i in range(600):
        msgs = conversation(rng)
        records.append(as_sharegpt(msgs) if i % 2 else {"messages": msgs})
    records += [{"messages": [{"role": "user", "content": "hello"}]},                       # no assistant turn
                {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
                {"messages": [{"role": "user", "content": "Repeat the words: " + "cat " * 200},
                              {"role": "assistant", "content": "cat " * 200}]}]             # too long
    data = work / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = SFTConfig(model=str(base_dir), data=str(data), out_dir=str(work / "sft"), max_length=128, batch_size=8,
                    micro_batch_size=8, max_steps=80, lr=2e-3, schedule="constant", val_fraction=0.05)
    return run_sft(cfg)


def test_sft_skips_and_reports_bad_conversations(sft, work):
    report = json.loads((work / "sft" / "data_report.json").read_text())["train"]
    assert report["skipped"] == {"no_assistant": 1, "unknown_role": 1, "too_long": 1}
    assert report["kept"] == 600
    assert sft["val_examples"] == 30 and sft["val_loss"] < 2.0


def test_sft_model_answers_in_chatml_and_stops_at_im_end(sft):
    from phikit.inference.decoding import complete
    model, tok = load(sft["model_dir"])
    im_end = tok.token_to_id(IM_END)
    rng = random.Random(99)  # held-out prompts: fresh draws, not the training conversations
    prompts = [render_chatml(conversation(rng)[:-1], add_generation_prompt=True) for _ in range(40)]
    results = complete(model, tok, prompts, max_new_tokens=24, stop_token_ids=[im_end])
    stopped = [r.finish_reason == "stop" and r.text.strip() != "" for r in results]
    assert sum(stopped) / len(stopped) >= 0.95, [r.text for r in results]


def test_exported_model_loads_in_transformers_with_the_same_chat_template_ids_and_logits(sft):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(sft["model_dir"])
    hf_model = transformers.PhiForCausalLM.from_pretrained(sft["model_dir"]).eval()
    model, tok = load(sft["model_dir"])
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What color is the cup?"},
            {"role": "assistant", "content": "The cup is red."}, {"role": "user", "content": "Repeat the words: hat"}]
    ours = tokenize_conversation(tok, msgs + [{"role": "assistant", "content": "hat"}]).input_ids
    theirs = hf_tok.apply_chat_template(msgs + [{"role": "assistant", "content": "hat"}], tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)
    prompt = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == render_chatml(msgs, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_model(ids).logits, rtol=1e-4, atol=1e-4)


def arithmetic_pairs(seed: int = 3):
    """'What is a + b?' (a, b < 5): the correct sum preferred over a wrong one. Each question's wrong answers are
    split between training (5) and held-out (3), so no held-out pair was ever trained on."""
    rng = random.Random(seed)
    train, heldout = [], []
    for a in range(5):
        for b in range(5):
            wrong = [x for x in range(9) if x != a + b]
            rng.shuffle(wrong)
            for i, w in enumerate(wrong):
                pair = {"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(w)}
                (train if i < 5 else heldout).append(pair)
    return train, heldout


def test_dpo_raises_heldout_preference_accuracy(sft, work):
    train, heldout = arithmetic_pairs()
    data, val = work / "pairs.jsonl", work / "pairs_val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    val.write_text("".join(json.dumps(r) + "\n" for r in heldout))
    model, tok = load(sft["model_dir"])
    held_pairs, _ = build_pair_examples(heldout, tok, 64)
    precompute_reference(model, held_pairs, 32, tok.eos_token_id)  # the SFT model is the reference
    likelihood_before = preference_accuracy(model, held_pairs, tok.eos_token_id)
    reward_before = reward_accuracy(model, held_pairs, tok.eos_token_id)
    # 450 steps with the lr decaying to 0 (cosine): the held-out likelihood ranking came out 0.92-1.0 for six pair
    # splits and data orders (arithmetic_pairs seeds 3-8, DPO seeds 0-5); 200 steps gave 0.79-0.93.
    cfg = DPOConfig(model=sft["model_dir"], data=str(data), val_data=str(val), out_dir=str(work / "dpo"),
                    max_length=64, beta=0.5, reference="precompute", batch_size=16, micro_batch_size=16,
                    max_steps=450, lr=1e-3, schedule="cosine")
    result = run_dpo(cfg)
    likelihood_after = preference_accuracy(result["model"], held_pairs, tok.eos_token_id)
    reward_after = reward_accuracy(result["model"], held_pairs, tok.eos_token_id)
    print(f"held-out preference: likelihood {likelihood_before:.2f} -> {likelihood_after:.2f}, "
          f"implicit reward {reward_before:.2f} -> {reward_after:.2f}")
    assert 0.3 <= likelihood_before <= 0.7 and reward_before == 0.5
    # The policy itself, not only DPO's implicit reward, must rank the right answer first: chosen answer + its
    # <|im_end|> more likely than rejected answer + <|im_end|>, on pairs whose wrong answer it never trained against.
    assert likelihood_after >= 0.9
    assert reward_after >= 0.9
    log = [json.loads(line) for line in (work / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in log if r.get("event") == "train"]
    assert train_logs[-1]["rewards/accuracies"] > train_logs[0]["rewards/accuracies"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(train_logs[-1])
