"""Multiple-choice scoring equals lm-evaluation-harness (HF backend on the exported checkpoint, same local data),
and the `phikit` harness backend gives the harness the same numbers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
# Harness task yaml -> (our task, split, local file, datasets builder)
CASES = {
    "arc_easy": ("arc/arc_easy.yaml", "test", "arc_easy/test.jsonl", "json"),
    "winogrande": ("winogrande/default.yaml", "validation", "winogrande/validation.jsonl", "json"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", "hellaswag/validation-00000-of-00001.parquet", "parquet"),
}


def harness_task(name: str):
    """The harness's own task config (prompts, targets, preprocessing), pointed at our local fixture file."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    yaml_file, split, data_file, builder = CASES[name]
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_file)
    cfg.pop("tag", None)
    cfg.update(task=f"fixture_{name}", dataset_path=builder, dataset_name=None,
               dataset_kwargs={"data_files": {split: str(FIXTURES / data_file)}},
               training_split=None, validation_split=None, test_split=None)
    cfg["validation_split" if split == "validation" else "test_split"] = split
    task = ConfigurableTask(config=cfg)
    task.set_config(key="num_fewshot", value=0)
    return task


def run_harness(lm, names):
    from lm_eval.evaluator import evaluate
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = evaluate(lm, {n: harness_task(n) for n in names}, log_samples=True, verbosity="ERROR")
    return {n: sorted(out["samples"][n], key=lambda s: s["doc_id"]) for n in names}


@pytest.fixture(scope="module")
def hf_samples(tiny_phi_checkpoint):
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=str(tiny_phi_checkpoint), device="cpu", batch_size=4, dtype="float32")
    return run_harness(lm, list(CASES))


@pytest.fixture(scope="module")
def loaded(tiny_phi_checkpoint):
    import phikit
    return phikit.load(tiny_phi_checkpoint)


@pytest.mark.parametrize("name", list(CASES))
def test_choices_and_loglikelihoods_equal_the_harness(name, hf_samples, loaded):
    from phikit.eval.multiple_choice import TASKS, evaluate_task
    from phikit.eval.scoring import LogLikelihoodScorer
    model, tokenizer = loaded
    ours = evaluate_task(TASKS[name], LogLikelihoodScorer(model, batch_tokens=256), tokenizer, FIXTURES,
                         progress=False)["records"]
    theirs = hf_samples[name]
    assert len(ours) == len(theirs) > 0
    for mine, ref in zip(ours, theirs):
        ref_lls = [r[0] for r in ref["filtered_resps"]]
        assert mine["loglikelihoods"] == pytest.approx(ref_lls, abs=1e-4)
        assert mine["is_greedy"] == [bool(r[1]) for r in ref["filtered_resps"]]
        if str(ref["target"]).isdigit():  # (WinoGrande's target is the scored suffix, its gold the context)
            assert mine["gold"] == int(ref["target"])
        assert mine["acc"] == ref["acc"]
        if "acc_norm" in ref:
            assert mine["acc_norm"] == ref["acc_norm"]


def test_phikit_backend_in_the_harness(hf_samples, loaded, tiny_phi_checkpoint):
    import phikit.eval.harness  # registers the backend
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM
    model, tokenizer = loaded
    lm = get_model("phikit")(model=model, tokenizer=tokenizer, batch_tokens=256)
    ours = run_harness(lm, ["arc_easy"])["arc_easy"]
    for mine, ref in zip(ours, hf_samples["arc_easy"]):
        assert [r[0] for r in mine["filtered_resps"]] == pytest.approx([r[0] for r in ref["filtered_resps"]], abs=1e-4)
    # Perplexity windows and generation through the harness API, against the HF backend.
    text = "The quick brown fox jumps over the lazy dog. " * 40
    hf = HFLM(pretrained=str(tiny_phi_checkpoint), device="cpu", batch_size=1, dtype="float32", max_length=64)
    lm_short = get_model("phikit")(model=model, tokenizer=tokenizer, max_length=64)
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert lm_short.loglikelihood_rolling(req, disable_tqdm=True)[0] == pytest.approx(
        hf.loglikelihood_rolling(req, disable_tqdm=True)[0], abs=1e-3)
    gen = [Instance("generate_until", {}, ("def add(a, b):", {"until": ["\n\n"], "max_gen_toks": 8}), 0)]
    assert lm_short.generate_until(gen, disable_tqdm=True) == hf.generate_until(gen, disable_tqdm=True)


def test_long_context_beside_long_option_fits_the_model(loaded):
    # Options run after the batch's padded context width: a 500-token question batched with another question's
    # 100-token option asked the model for 599 positions (of 512) and raised.
    from phikit.eval.scoring import LogLikelihoodScorer
    model, _ = loaded
    assert model.config.max_position_embeddings == 512
    requests = [(list(range(1000, 1500)), [7]), (list(range(2000, 2010)), list(range(3000, 3100)))]
    together = LogLikelihoodScorer(model, batch_tokens=100_000).score(requests)
    alone = LogLikelihoodScorer(model, batch_tokens=1).score(requests)
    assert [s.logprob for s in together] == pytest.approx([s.logprob for s in alone], abs=1e-4)


@pytest.fixture(scope="module")
def masked_checkpoint(tmp_path_factory, tiny_phi_checkpoint):
    """The tiny model with its padding rows' lm_head bias at -1e4: phikit never generates the rows past the
    tokenizer (HF may, on random weights), so the generations compared below do not depend on them."""
    import phikit
    import torch
    model, tokenizer = phikit.load(tiny_phi_checkpoint)
    with torch.no_grad():
        model.lm_head.bias[len(tokenizer):] = -1e4
    return phikit.save(model, tokenizer, tmp_path_factory.mktemp("masked") / "tiny-phi")


def test_generate_until_equals_the_hf_backend_on_long_empty_and_batched_requests(masked_checkpoint):
    # generate_until kept whole prompts up to the model's 512 positions where the HF backend keeps the last
    # max_length - max_gen_toks tokens, and failed the whole run on an empty context or an '' stop string.
    import random

    import phikit.eval.harness  # noqa: F401  (registers the backend)
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM
    long = "The quick brown fox jumps over the lazy dog. " * 20  # ~200 tokens, past max_length=64
    contexts = ["def add(a, b):", "Question: 2+2?\nAnswer:", long, "Once upon a time", "x", "A B C D"]
    settings = [{"until": ["\n\n"], "max_gen_toks": 8}, {"until": ["ed 27"], "max_gen_toks": 10},
                {"until": "ing", "max_gen_toks": 10, "do_sample": False}]
    args = [(c, dict(g)) for g in settings for c in contexts]
    random.Random(0).shuffle(args)
    requests = [Instance("generate_until", {}, a, i) for i, a in enumerate(args)]
    hf = HFLM(pretrained=str(masked_checkpoint), device="cpu", batch_size=7, dtype="float32", max_length=64)
    expected = hf.generate_until(requests, disable_tqdm=True)
    for batch_size in (1, 7):
        lm = get_model("phikit").create_from_arg_string(f"pretrained={masked_checkpoint},max_length=64",
                                                         {"batch_size": batch_size, "device": "cpu"})
        assert lm.generate_until(requests, disable_tqdm=True) == expected
    # An empty context continues from <|endoftext|>, as loglikelihood conditions an empty context on it.
    empty = [Instance("generate_until", {}, ("", {"until": ["\n"], "max_gen_toks": 6}), 0)]
    eot = [Instance("generate_until", {}, ("<|endoftext|>", {"until": ["\n"], "max_gen_toks": 6}), 0)]
    assert lm.generate_until(empty, disable_tqdm=True) == hf.generate_until(eot, disable_tqdm=True)
    # An '' stop string stops nothing (the HF backend's stopping rule would end every row after one token).
    blank = [Instance("generate_until", {}, (c, {"until": ["ed 27", ""], "max_gen_toks": 10}), i)
             for i, c in enumerate(contexts)]
    same_without_blank = {a[0]: e for a, e in zip(args, expected) if a[1] == settings[1]}
    assert lm.generate_until(blank, disable_tqdm=True) == [same_without_blank[c] for c in contexts]


def test_model_args_are_checked_and_parsed(tiny_phi_checkpoint):
    # A misspelt model_arg ran the evaluation without it; dtype=auto (the HF backend's default) and quantize=
    # (as phikit.load) were refused or ignored.
    import phikit.eval.harness  # noqa: F401
    import torch
    from lm_eval.api.registry import get_model
    make = get_model("phikit").create_from_arg_string
    extra = {"batch_size": 1, "max_batch_size": None, "device": "cpu"}
    with pytest.raises(ValueError, match="unknown phikit model_args dtpye"):
        make(f"pretrained={tiny_phi_checkpoint},dtpye=bf16", extra)
    assert make(f"pretrained={tiny_phi_checkpoint},dtype=auto", extra).model.lm_head.weight.dtype == torch.float32
    assert make(f"pretrained={tiny_phi_checkpoint},dtype=bfloat16", extra).model.lm_head.weight.dtype == torch.bfloat16
    assert getattr(make(f"pretrained={tiny_phi_checkpoint},quantize=int8", extra).model, "quantized", None) == "int8"
