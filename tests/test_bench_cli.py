"""`phikit bench` and the benchmark scripts: argument checks, the JSON line last, and the figures they report.
Only tiny settings run here; the speed targets themselves live in benchmarks/."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from phikit.cli import main as cli_main

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_module(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:  # as `python benchmarks/NAME.py` has it: shared helpers import by name
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"phikit_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(monkeypatch, capsys, name: str, *argv: str) -> dict:
    """Run a benchmark's main() in this process; its last stdout line, parsed as JSON."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    bench_module(name).main()
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bare_bench_names_the_benchmarks(capsys):
    assert cli_main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "name a benchmark" in err and "matvec" in err and "prompt_lookup" in err
    assert "\n" not in err.strip()  # one line, no usage dump


def test_unknown_benchmark_is_one_line(capsys):
    assert cli_main(["bench", "nope"]) == 2
    assert "no benchmark named 'nope'" in capsys.readouterr().err


TINY_DECODE = ["--preset", "tiny", "--batches", "1", "--prompt-len", "8", "--skip-transformers", "--llama-types", ""]
TINY_LM = ["--preset", "tiny", "--new-tokens", "4", "--threads", "1"]


# Each case also passes tiny sizes, so that a check that stops working costs seconds, not a phi-1.5 run.
@pytest.mark.parametrize("name, argv", [
    ("decode", [*TINY_DECODE, "--new-tokens", "1"]),  # decode speed needs tokens beyond the first: was 1/0
    ("decode", [*TINY_DECODE, "--modes", "fp32,bogus"]),
    ("decode", [*TINY_DECODE, "--repeats", "0"]),
    ("train", ["--preset", "tiny", "--seq-len", "16", "--batch", "1", "--steps", "1", "--rounds", "0"]),
    ("pack", ["--docs", "10", "--repeat", "0"]),
    ("predicted_outputs", [*TINY_LM, "--repeats", "0"]),  # was a KeyError after the whole run
    ("prompt_lookup", [*TINY_LM, "--repeats", "0"]),
    ("eval", ["--preset", "tiny", "--skip-sandbox", "--items", "0"]),
    ("serve", ["--max-tokens", "4", "--clients", "0"]),
])
def test_bad_arguments_are_usage_errors(monkeypatch, capsys, name, argv):
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as exc:
        bench_module(name).main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "must be >= " in err or "unknown mode" in err


def test_decode_row_with_untimeable_steps_has_no_negative_speed():
    decode = bench_module("decode")
    engine = decode.Timed("phikit-fp32", lambda n: None, "cpu")
    engine.times = {1: [0.002], 4: [0.0015]}  # two separate medians: noise made the longer run look shorter
    row = decode.timing_row(engine, 1, 16, 4, 10**6, 20.0)
    assert row["decode_tok_s"] is None and row["ms_per_step"] is None and row["floor_fraction"] is None
    assert row["prefill_tok_s"] > 0


def test_decode_ratios_pair_the_rounds_of_one_turn():
    decode = bench_module("decode")
    ours, theirs = [0.10, 0.10, 0.30], [0.11, 0.33, 0.33]  # theirs 1.1x slower in each round; round 2 on a slow host
    assert decode.paired_speed_ratio(ours, 1, theirs, 1) == 1.1  # the ratio of the two medians says 3.3
    assert decode.paired_speed_ratio([0.2, 0.2], 8, [0.1, 0.1], 1) == 4.0  # speeds: 8 rows per step against 1
    assert decode.paired_speed_ratio([0.1, -0.01, 0.1], 1, [0.2, 0.2, 0.3], 1) == 2.5  # an untimeable round left out
    assert decode.paired_speed_ratio([0.1], 1, [0.1, 0.1], 1) is None  # not the same turns
    engine = decode.Timed("phikit-fp32", lambda n: None, "cpu")
    engine.times = {1: [1.0, 2.0], 5: [1.4, 2.8]}
    assert engine.round_steps(5) == pytest.approx([0.1, 0.2])


def test_prompt_lookup_counts_tokens_per_pass_without_the_prompt_pass(monkeypatch, capsys):
    out = run_main(monkeypatch, capsys, "prompt_lookup", "--preset", "tiny", "--new-tokens", "11", "--draft", "4",
                   "--repeats", "1", "--threads", "1")
    rows = {r["engine"]: r for r in out["rows"]}
    assert out["benchmark"] == "prompt_lookup" and out["new_tokens"] == 11
    assert rows["plain"]["tokens_per_pass"] == 1.0  # one token per decoding pass, by definition (was 1.1)
    assert rows["ceiling-4"]["passes"] == 3 and rows["ceiling-4"]["tokens_per_pass"] == 4 + 1  # at most N + 1


def test_train_bench_leaves_no_scratch_files(monkeypatch, capsys, tmp_path):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = run_main(monkeypatch, capsys, "train", "--preset", "tiny", "--seq-len", "16", "--batch", "1",
                   "--rounds", "1", "--steps", "1")
    assert out["benchmark"] == "train" and out["phikit_tokens_per_s"] > 0
    assert list(tmp_path.glob("phikit-bench-train-*")) == []  # the random shards were left in /tmp on every run


def test_decode_check_finite_reports_each_format_and_fails_on_nan(monkeypatch, capsys):
    out = run_main(monkeypatch, capsys, "decode", *TINY_DECODE, "--modes", "fp32,fp16", "--new-tokens", "3",
                   "--repeats", "1", "--check-finite")
    assert out["finite"] == {"fp32": True, "fp16": True}
    decode = bench_module("decode")
    model = decode.build_model(decode.get_config("tiny")).eval()
    with torch.no_grad():
        model.lm_head.bias.fill_(float("nan"))
    assert decode.finite_logits(model, torch.tensor([[1, 2, 3]])) is False


def test_shared_helpers_are_not_listed_as_benchmarks(capsys):
    # benchmarks/lm_setup.py is imported by two benchmarks; run on its own it did nothing and exited 0.
    assert cli_main(["bench", "lm_setup"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark named 'lm_setup'" in err and "lm_setup," not in err and "prompt_lookup" in err


def test_llama_cpp_decodes_a_batch_as_each_sequence_alone(phi_tokenizer):
    """The llama.cpp rows at batch > 1 go through its batch API: sequences decoded together must each give the greedy
    tokens they give alone (positions and sequence ids kept apart), and those must be phikit's on the same model."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python to time llama.cpp")
    from phikit import build_model, get_config
    from phikit.inference.decoding import complete
    decode = bench_module("decode")
    config = get_config("tiny", vocab_size=51200, tokenizer_vocab_size=len(phi_tokenizer), initializer_range=0.1)
    model = build_model(config, seed=0).eval()
    args = SimpleNamespace(threads=2, prompt_len=6, new_tokens=8)
    prompts = [phi_tokenizer.encode(t)[:6] for t in ("def fib(n):\n    return", "Alice: hello there, Bob said")]
    llama = decode.LlamaCpp(llama_cpp, model, phi_tokenizer, "f32", args)
    try:
        together = llama.timed(prompts)
        together.fn(8)
        both = llama.tokens
        alone = []
        for prompt in prompts:
            llama.timed([prompt]).fn(8)
            alone += llama.tokens
    finally:
        llama.close()
    ours = [r.token_ids for r in complete(model, phi_tokenizer, prompts, max_new_tokens=7, stop_token_ids=[])]
    assert both == alone == ours and all(len(t) == 7 for t in both)
