"""Procedural exercises: answers verified by execution in the sandbox, held-out split disjoint from train."""
from __future__ import annotations

import ast
import operator
import re

import pytest

from phikit.data import procedural
from phikit.sandbox import run_code


def _eval_expr(expr: str) -> int:
    """An independent evaluator (Python's own parser) for the arithmetic questions."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}

    def ev(node):
        if isinstance(node, ast.BinOp):
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        assert isinstance(node, ast.Constant)
        return node.value
    return ev(ast.parse(expr, mode="eval").body)


def test_deterministic_and_mixed():
    a = procedural.generate(400, "train", seed=5)
    assert a == procedural.generate(400, "train", seed=5)
    assert a != procedural.generate(400, "train", seed=6)
    assert {r["kind"] for r in a} == set(procedural.DEFAULT_KINDS)
    assert len({r["key"] for r in a}) == 400


def test_heldout_disjoint_from_train():
    train = procedural.generate(3000, "train", seed=0)
    heldout = procedural.generate(300, "heldout", seed=1)
    group = lambda r: r.get("group", r["key"])
    assert not {group(r) for r in train} & {group(r) for r in heldout}
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert all(r["split"] == "heldout" for r in heldout)


def test_answers_are_verified_by_execution():
    records = procedural.generate(600, "train", seed=2) + procedural.generate(100, "heldout", seed=2)
    assert all(procedural.verify(records))
    # a wrong answer must be caught: the check really runs
    bad = dict(records[0], check=records[0]["check"].replace("==", "!=", 1) if "==" in records[0]["check"]
               else "assert False\n")
    assert procedural.verify([bad]) == [False]


def test_arithmetic_and_word_problems_against_python():
    for r in procedural.generate(300, "train", seed=3, kinds=("arithmetic", "word_problem")):
        assert procedural.parse_answer(r["text"]) == r["answer"]
        assert r["text"].startswith(r["prompt"])
        assert re.search(r"Step 1: .*\nStep 2: |Step 1: ", r["text"])
        if r["kind"] == "arithmetic":
            assert _eval_expr(r["question"][len("What is "):-1]) == r["answer"]
        else:
            if r["phrasing"] == "suppose":  # the apples example of the phi-1.5 report, with its structure
                assert r["question"].startswith("Suppose ") and "originally had" in r["question"]
            assert "Therefore" in r["text"]


def test_word_problems_in_many_phrasings_with_correct_steps():
    """Every training phrasing occurs; each step's arithmetic is right by Python's own evaluator and the last
    count is the answer."""
    problems = procedural.generate(400, "train", seed=7, kinds=("word_problem",))
    assert {r["phrasing"] for r in problems} == {p.name for p in procedural.TRAIN_PHRASINGS}
    assert len({r["question"].split(" ")[1] for r in problems}) > 5  # openings differ, not one template
    for r in problems:
        sums = re.findall(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)", r["text"])
        assert sums
        for a, op, b, c in sums:
            assert _eval_expr(f"{a} {op.replace('/', '//')} {b}") == int(c), r["text"]
        assert int(sums[-1][3]) == r["answer"]
        assert procedural.parse_answer(r["text"]) == r["answer"]


def held_out_phrasing_patterns() -> list[re.Pattern]:
    """A regex per held-out phrasing template (the placeholders match anything short)."""
    templates = []
    for p in procedural.NEW_PHRASINGS:
        templates += [p.start[1], p.ask] + [t for ts in p.events.values() for t in ts]
        templates += [c.strip() for c in p.connectors]
    return [re.compile(re.sub(r"\\\{\w+\\\}", lambda m: r"[\w' ]{1,40}?", re.escape(t))) for t in templates]


def test_new_phrasings_are_held_out_only():
    with pytest.raises(ValueError, match="held out only"):
        procedural.generate(5, "train", kinds=("word_problem_new_phrasing",))
    kinds = tuple(k for k in procedural.KINDS if k not in procedural.HELDOUT_ONLY)
    train = procedural.generate(3000, "train", seed=0, kinds=kinds)
    new = procedural.generate(40, "heldout", seed=0, kinds=("word_problem_new_phrasing",))
    patterns = held_out_phrasing_patterns()
    assert all(any(p.search(r["text"]) for p in patterns) for r in new)  # the patterns do find them
    assert not [r["text"] for r in train if any(p.search(r["text"]) for p in patterns)]
    assert all(procedural.verify(new))


def test_fact_tables_teach_every_one_digit_fact_correctly():
    """Fact-table pages (the textbook side of easy arithmetic): every line is right by Python's own evaluator,
    and a few hundred pages cover the whole one-digit table that the easy exercises draw on."""
    pages = procedural.generate(400, "train", seed=4, kinds=("arithmetic_facts",))
    assert all(procedural.verify(pages[:50]))
    seen = set()
    for page in pages:
        title, *lines = page["text"].split("\n")
        assert title.endswith(":") and len(lines) == 9
        for line in lines:
            expr, value = line.rstrip(".").split(" = ")
            assert _eval_expr(expr) == int(value), line
            seen.add(expr)
    table = {f"{a} {op} {b}" for a in range(2, 11) for b in range(2, 11) for op in "+-*"}
    assert table <= seen


def test_python_functions_pass_their_tests_in_the_sandbox():
    funcs = procedural.generate(5, "train", seed=4, kinds=("python",))
    for r in funcs:
        assert '"""' in r["text"] and "assert " in r["text"] and f"def {r['entry_point']}(" in r["text"]
        result = run_code(r["text"], timeout=10)
        assert result.passed, result.stderr
    # the tests are real: a function whose body returns nothing fails them
    first = funcs[0]["text"]
    gutted = re.sub(r'(    """\n)(.*?)(\n\n\nassert)', r"\1    return None\3", first, flags=re.S)
    assert gutted != first and not run_code(gutted, timeout=10).passed


def test_sft_mix_teaches_scope_and_follow_ups():
    """Every conversation kind is in the mix; a follow-up continues from the answer of the turn before, with
    right arithmetic; refusals and introductions say what the model can do."""
    from phikit.data.conversations import CONVERSATION_KINDS, sft_mix
    records = procedural.generate(1500, "train", seed=1, kinds=("arithmetic_easy", "word_problem", "python"))
    convs = sft_mix(records, seed=1)
    assert sft_mix(records, seed=1) == convs and {c["kind"] for c in convs} >= set(CONVERSATION_KINDS)
    for c in convs:
        roles = [m["role"] for m in c["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and all(m["content"] for m in c["messages"])
    follow_ups = [c["messages"] for c in convs if c["kind"] == "follow_up"]
    assert len(follow_ups) > 20
    for m in follow_ups:
        before = procedural.parse_answer(m[1]["content"])
        (a, op, b, c), = re.findall(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)", m[3]["content"])
        assert int(a) == before and _eval_expr(f"{a} {op} {b}") == int(c) == procedural.parse_answer(m[3]["content"])
        assert str(b) in m[2]["content"]  # the number the follow-up asked about
    for c in convs:
        if c["kind"] in ("refusal", "identity", "greeting", "capabilities"):
            assert "arithmetic, word problems and small Python functions" in c["messages"][1]["content"]
    code = [c["messages"] for c in convs if c["kind"] == "code_request"]
    assert all(run_code(m[1]["content"], timeout=10).passed for m in code[:5])  # whole functions that run
    # one-event word problems (the exercises have 2-4 events): a start, one event, the total, all from training
    one_event = [c["messages"] for c in convs if c["kind"] == "one_event_problem"]
    assert len(one_event) > 20
    for user, answer in ((m[0]["content"], m[1]["content"]) for m in one_event):
        assert answer.count("Step ") == 3 and procedural.split_of(f"word:{user}") == "train"
        *_, last = re.findall(r"= (-?\d+) ", answer)
        assert int(last) == procedural.parse_answer(answer)
    # everyday words for a few functions ("the square of a number" is power_of_2)
    everyday = [c["messages"] for c in convs if c["kind"] == "everyday_code"]
    squares = [m for m in everyday if "square of" in m[0]["content"]]
    assert squares and all(m[1]["content"].startswith("def power_of_2(x):") for m in squares)


def test_a_function_to_complete_is_answered_from_its_signature_line():
    """Asked to complete a signature and docstring, the assistant answers with the signature line and the body, not
    the docstring copied back; that answer passes the exercise's own tests in the sandbox."""
    from phikit.data.conversations import complete_request, python_parts, sft_mix
    records = procedural.generate(1500, "train", seed=2, kinds=("arithmetic", "python"))
    exercise = {complete_request(python_parts(r["text"])[0]): r for r in records if r["kind"] == "python"}
    asked = [c["messages"] for c in sft_mix(records, seed=2)
             if c["kind"] == "code_request" and c["messages"][0]["content"] in exercise]
    assert len(asked) > 10
    for user, answer in ((m[0]["content"], m[1]["content"]) for m in asked[:5]):
        signature, _, tests = python_parts(exercise[user]["text"])
        assert answer.startswith(signature.split("\n")[0] + "\n    ") and '"""' not in answer
        assert run_code(answer + "\n\n" + tests, timeout=10).passed
