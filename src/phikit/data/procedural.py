"""A teacher-free generator of textbook exercises with verified answers (what the built-in demo trains on).

Four kinds, mixed: arithmetic with step-by-step solutions, word problems in the style of the phi-1.5 report's
apples example, Python functions with docstrings and tests, and short explanatory passages. Everything is
deterministic by seed. The train/held-out split is a property of each exercise (a hash of its `group`, or of its
`key`, the problem itself), so the two splits can never share an exercise, whatever the seeds.

Each record has `text` (the training text), `kind`, `key`, `split`, and `check`: a small Python program that
asserts the stated answer (or runs the function's tests); `verify()` executes those in the code sandbox.
Arithmetic and word problems also carry `question`, `prompt` (the text up to the solution) and `answer` (int).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

KINDS = ("arithmetic", "word_problem", "python", "passage", "arithmetic_easy", "arithmetic_facts",
         "word_problem_new_phrasing")
MIX = {"arithmetic": 0.3, "word_problem": 0.3, "python": 0.25, "passage": 0.15, "arithmetic_easy": 0.0,
       "arithmetic_facts": 0.0, "word_problem_new_phrasing": 0.0}
HELDOUT_ONLY = ("word_problem_new_phrasing",)  # phrasings kept out of every training text
DEFAULT_KINDS = ("arithmetic", "word_problem", "python", "passage")  # the other two only when asked for
HELDOUT_FRACTION = 0.1


def split_of(key: str) -> str:
    """'heldout' for a fixed ~10% of all possible exercises, 'train' for the rest."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return "heldout" if h % 1000 < HELDOUT_FRACTION * 1000 else "train"


def generate(n: int, split: str = "train", seed: int = 0, kinds: tuple[str, ...] | None = None) -> list[dict]:
    """n exercises of the given split, deterministic in (n, split, seed, kinds); no duplicate keys."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    kinds = tuple(kinds or DEFAULT_KINDS)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown kind {k!r}: choose from {', '.join(KINDS)}")
        if k in HELDOUT_ONLY and split == "train":
            raise ValueError(f"{k} exercises are held out only (their phrasings never appear in training text): "
                             f"use split='heldout'")
    rng = random.Random(f"phikit-procedural/{seed}/{split}")
    weights = [MIX[k] or 1.0 for k in kinds] if len(kinds) == 1 else [MIX[k] for k in kinds]
    out: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        kind = rng.choices(kinds, weights)[0]
        rec = MAKERS[kind](rng)
        if rec["key"] in seen or split_of(rec.get("group", rec["key"])) != split:
            misses += 1
            if misses > 50 * n + 10_000:
                raise RuntimeError(f"could not find {n} distinct {split} exercises of kinds {kinds}: ask for fewer")
            continue
        seen.add(rec["key"])
        rec["kind"], rec["split"] = kind, split
        out.append(rec)
    return out


def parse_answer(text: str) -> int | None:
    """The integer after the last 'Answer:' in a completion (None if there is none): how answers are read back."""
    m = re.findall(r"Answer:[^\d\-]*(-?\d[\d,]*)", text)
    return int(m[-1].replace(",", "")) if m else None


# --- arithmetic -----------------------------------------------------------------------------------------------

_OP_WORDS = {"+": "add", "-": "subtract", "*": "multiply"}


def arithmetic_easy(rng: random.Random) -> dict:
    """First-grade arithmetic for models trained in minutes: one or two operations on numbers up to 10. Held-out
    one-step facts still appear as steps of longer training problems, which is how a small model learns them."""
    return arithmetic(rng, ops=(1, 1, 2), high=10)


def arithmetic_facts(rng: random.Random) -> dict:
    """A page of a number-facts table, drilled the way a first-grade textbook does it: one number combined with
    each of 2..10 by one operation, in shuffled order. Besides the one-digit table, pages count on and back by a
    single digit from larger or negative numbers, which are the second steps of two-operation exercises.
    Exercises are held out; the facts they use, like a times table, are taught."""
    op = rng.choice("+-*")
    start = rng.random()
    if op == "*" or start < 0.5:
        a = rng.randint(2, 10)
    elif start < 0.9:
        a = rng.randint(11, 99)
    else:
        a = rng.randint(-9, -1)
    bs = list(range(2, 11))
    rng.shuffle(bs)
    value = {"+": lambda b: a + b, "-": lambda b: a - b, "*": lambda b: a * b}[op]
    title = {"+": f"Adding to {a}", "-": f"Subtracting from {a}", "*": f"Multiplying by {a}"}[op]
    lines = [f"{a} {op} {b} = {value(b)}." for b in bs] if op != "*" else [f"{b} * {a} = {value(b)}." for b in bs]
    text = f"{title}:\n" + "\n".join(lines)
    check = "".join(f"assert {line.rstrip('.').replace('=', '==')}\n" for line in lines)
    return {"text": text, "key": f"facts:{text}", "check": check}


def arithmetic(rng: random.Random, ops: tuple[int, ...] = (1, 2, 2, 3), high: int = 60) -> dict:
    """An expression of 1-3 operations with precedence and parentheses, solved one operation per step."""
    n_ops = rng.choice(ops)
    nums = [rng.randint(2, high) for _ in range(n_ops + 1)]
    ops = [rng.choice("+-*") for _ in range(n_ops)]
    # Multiplications use small factors so the numbers stay readable.
    for i, op in enumerate(ops):
        if op == "*":
            nums[i + 1] = rng.randint(2, min(12, high))
    paren = n_ops >= 2 and rng.random() < 0.4
    tokens: list = []
    for i, x in enumerate(nums):
        tokens.append(x)
        if i < n_ops:
            tokens.append(ops[i])
    if paren:  # wrap the first operation: (a op b) op c ...
        tokens = [["(", tokens[0], tokens[1], tokens[2], ")"]] + tokens[3:]
    expr = _render(tokens)
    steps: list[str] = []
    value = _solve(tokens, steps)
    question = f"What is {expr}?"
    lines = [f"Step {i}: {s}" for i, s in enumerate(steps, 1)]
    prompt = f"Question: {question}\n"
    text = prompt + "\n".join(lines) + f"\nAnswer: {value}"
    return {"text": text, "key": f"arith:{expr}", "question": question, "prompt": prompt, "answer": value,
            "check": f"assert ({expr}) == {value}\n"}


def _render(tokens: list) -> str:
    parts = []
    for t in tokens:
        if isinstance(t, list):
            parts.append("(" + _render(t[1:-1]) + ")")
        else:
            parts.append(str(t))
    return " ".join(parts)


def _solve(tokens: list, steps: list[str]) -> int:
    """Evaluate a flat token list (numbers, operators, parenthesized sublists), recording each operation."""
    tokens = [(_solve(t[1:-1], steps) if isinstance(t, list) else t) for t in tokens]
    if any(isinstance(t, list) for t in tokens):  # pragma: no cover - sublists are solved above
        raise AssertionError
    if len(tokens) > 3 and "*" in tokens and any(t in "+-" for t in tokens if isinstance(t, str)):
        steps.append("Multiplication comes before addition and subtraction.")
    while "*" in tokens:
        i = tokens.index("*")
        a, b = tokens[i - 1], tokens[i + 1]
        steps.append(f"{a} * {b} = {a * b}.")
        tokens[i - 1:i + 2] = [a * b]
    while len(tokens) > 1:
        a, op, b = tokens[:3]
        r = a + b if op == "+" else a - b
        steps.append(f"{a} {op} {b} = {r}.")
        tokens[:3] = [r]
    return tokens[0]


# --- word problems (the apples example of the phi-1.5 report, in many phrasings) --------------------------------

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kofi", "Lena",
         "Maya", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "books", "cookies", "coins", "shells", "stamps", "cards",
         "oranges", "balloons", "crayons", "buttons", "seeds", "cupcakes", "toy cars", "feathers"]


@dataclass(frozen=True)
class Phrasing:
    """One way of telling a word problem. Each event is (connector, clause); the solution's step for an event
    restates its clause, so a solution reads the same way its question does. `sentences` tells the events as
    sentences of their own, otherwise as one sentence joined by commas."""
    name: str
    start: tuple[str, str]
    events: dict[str, tuple[str, ...]]   # get | give | times | half -> clause templates
    connectors: tuple[str, ...]
    ask: str
    sentences: bool = True
    weight: float = 1.0


TRAIN_PHRASINGS = (
    Phrasing("suppose", ("Suppose ", "{hero} originally had {n} {item}"), {
        "get": ("{other} gave {hero} {k} {item}",), "give": ("{hero} gave {other} {k} {item}",),
        "times": ("{other} gave {hero} {k}x the amount of {item} {hero} had",),
        "half": ("{hero} gave half of the {item} to {other}",)},
        ("then ",), "How many {item} does {hero} have now?", sentences=False, weight=2.0),
    Phrasing("present", ("", "{hero} has {n} {item}"), {
        "get": ("{other} gives {hero} {k} more {item}", "{hero} buys {k} more {item}"),
        "give": ("{hero} gives {k} {item} to {other}", "{hero} loses {k} {item}"),
        "times": ("{other} gives {hero} {k} times as many {item} as {hero} has",),
        "half": ("{hero} gives half of the {item} to {other}",)},
        ("", "Then ", "Next, "), "How many {item} does {hero} have?"),
    Phrasing("past", ("", "{hero} had {n} {item}"), {
        "get": ("{hero} bought {k} more {item}", "{other} gave {hero} {k} more {item}"),
        "give": ("{hero} lost {k} {item}", "{hero} sold {k} {item} to {other}"),
        "times": ("{other} gave {hero} {k} times as many {item} as {hero} had",),
        "half": ("{hero} shared half of the {item} with {other}",)},
        ("Then ", "Later, ", "After that, "), "How many {item} does {hero} have now?"),
    Phrasing("starts", ("", "{hero} starts with {n} {item}"), {
        "get": ("{hero} finds {k} more {item}", "{other} adds {k} {item} to {hero}'s pile"),
        "give": ("{hero} gives away {k} {item}", "{other} takes {k} {item} from {hero}"),
        "times": ("{other} gives {hero} {k} times the number of {item} {hero} has",),
        "half": ("{hero} gives away half of the {item}",)},
        ("", "Then ", "Next, "), "How many {item} does {hero} have at the end?"),
)
# Phrasings that no training text uses: held-out word problems told this way measure whether a model reads the
# story or recalls a template.
NEW_PHRASINGS = (
    Phrasing("owned", ("At first, ", "{hero} owned {n} {item}"), {
        "get": ("{hero} received {k} {item} from {other}", "{hero} picked up {k} extra {item}"),
        "give": ("{hero} handed {k} {item} over to {other}", "{hero} misplaced {k} {item}"),
        "times": ("{other} handed {hero} {k} times the {item} {hero} owned",),
        "half": ("{hero} handed half of the {item} over to {other}",)},
        ("Afterwards, ", "Soon after, "), "What is the total number of {item} {hero} owns at the end?"),
    Phrasing("collection", ("", "{hero}'s collection holds {n} {item}"), {
        "get": ("{other} donates {k} {item} to {hero}'s collection", "{hero} collects {k} additional {item}"),
        "give": ("{hero} trades away {k} {item}", "{hero} donates {k} {item} to {other}"),
        "times": ("{other} donates {k} times what the collection holds",),
        "half": ("{hero} splits the collection and donates half to {other}",)},
        ("Subsequently, ", "Following that, "), "How large is {hero}'s collection of {item} in the end?"),
)


def _tell(phrasing: Phrasing, rng: random.Random, hero: str, item: str, count: int,
          events: list[tuple[str, int, str]]) -> tuple[str, list[str]]:
    """(question, clauses): the story of events [(other, k, clause template)] in one phrasing."""
    fill = lambda t, **kw: t.format(hero=hero, item=item, **kw)
    opening = fill(phrasing.start[1], n=count)
    clauses = [fill(t, other=o, k=k) for o, k, t in events]
    told = [rng.choice(phrasing.connectors) + c for c in clauses]
    if phrasing.sentences:
        story = ". ".join([phrasing.start[0] + opening] + [_cap(t) for t in told])
    else:
        story = phrasing.start[0] + ", ".join([opening] + told[:-1]) + ", and " + told[-1]
    return story + ". " + fill(phrasing.ask), [opening] + clauses


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def word_problem(rng: random.Random, phrasings: tuple[Phrasing, ...] = TRAIN_PHRASINGS,
                 events: tuple[int, int] = (2, 4)) -> dict:
    """A person's count of items changes through `events` (least, most) events, told in one of `phrasings`; the
    solution restates each event and tracks the count step by step."""
    phrasing = rng.choices(phrasings, [p.weight for p in phrasings])[0]
    hero, *others = rng.sample(NAMES, 4)
    item = rng.choice(ITEMS)
    start = count = rng.randint(2, 20)
    told, maths, program = [], [], [f"count = {count}"]
    for _ in range(rng.randint(*events)):
        kind = rng.choice(["get", "get", "give", "times", "half"])
        other = rng.choice(others)
        if kind == "give" and count < 2:
            kind = "get"
        if kind == "half" and count % 2:
            kind = "times"
        if kind == "times" and count > 40:
            kind = "give"
        template = rng.choice(phrasing.events[kind])
        if kind == "get":
            k = rng.randint(1, 15)
            maths.append(f"so {hero} now has {count} + {k} = {count + k} {item}.")
            count += k
            program.append(f"count += {k}")
        elif kind == "give":
            k = rng.randint(1, count - 1)
            maths.append(f"so {hero} now has {count} - {k} = {count - k} {item}.")
            count -= k
            program.append(f"count -= {k}")
        elif kind == "times":
            k = rng.randint(2, 3)
            extra = k * count
            maths.append(f"so {hero} gets {k} * {count} = {extra} {item}. Now {hero} has {count} + {extra} = "
                         f"{count + extra} {item}.")
            count += extra
            program.append(f"count += {k} * count")
        else:
            half = count // 2
            maths.append(f"half of {count} is {count} / 2 = {half}, so {hero} now has {count} - {half} = "
                         f"{count - half} {item}.")
            count -= half
            program.append("count -= count // 2")
        told.append((other, k if kind != "half" else 0, template))
    question, clauses = _tell(phrasing, rng, hero, item, start, told)
    steps = [_cap(clauses[0]) + "."] + [_cap(c) + (": " if m.startswith("half") else ", ") + m
                                        for c, m in zip(clauses[1:], maths)]
    steps.append(f"Therefore, {hero} now has {count} {item}.")
    prompt = f"Question: {question}\nSolution:\n"
    text = prompt + "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1)) + \
        f"\nAnswer: {hero} has {count} {item} now."
    program.append(f"assert count == {count}")
    return {"text": text, "key": f"word:{question}", "question": question, "prompt": prompt, "answer": count,
            "check": "\n".join(program) + "\n", "phrasing": phrasing.name, "hero": hero, "item": item,
            "others": others}


def word_problem_new_phrasing(rng: random.Random) -> dict:
    """A word problem told in a phrasing that no training text uses (held out only)."""
    return word_problem(rng, NEW_PHRASINGS)


# --- Python functions with docstrings and tests ---------------------------------------------------------------
# Each entry: (name, signature args, docstring, body, reference implementation used to compute the expected
# values of the tests independently of the body, input maker). `{k}` is a constant drawn per exercise.

def _ints(rng, lo=-20, hi=40, n=None):
    return [rng.randint(lo, hi) for _ in range(n if n is not None else rng.randint(0, 7))]


def _word(rng):
    return "".join(rng.choice("abcdeilmnorstuy") for _ in range(rng.randint(1, 8)))


PY_TASKS: list[tuple[str, str, str, str, Callable, Callable]] = [
    ("sum_greater_than_{k}", "numbers", "Return the sum of the numbers in `numbers` that are greater than {k}.",
     "total = 0\nfor x in numbers:\n    if x > {k}:\n        total += x\nreturn total",
     lambda k, xs: sum(filter(lambda v: v > k, xs)), lambda rng: (_ints(rng),)),
    ("count_multiples_of_{k}", "numbers", "Count how many numbers in `numbers` are divisible by {k}.",
     "count = 0\nfor x in numbers:\n    if x % {k} == 0:\n        count += 1\nreturn count",
     lambda k, xs: len([v for v in xs if v % k == 0]), lambda rng: (_ints(rng),)),
    ("add_{k}_to_each", "numbers", "Return a new list with {k} added to every number in `numbers`.",
     "return [x + {k} for x in numbers]",
     lambda k, xs: list(map(lambda v: v + k, xs)), lambda rng: (_ints(rng),)),
    ("multiply_by_{k}", "x", "Return x multiplied by {k}.",
     "return x * {k}", lambda k, x: sum([x] * k), lambda rng: (rng.randint(-50, 50),)),
    ("power_of_{k}", "x", "Return x raised to the power {k}.",
     "result = 1\nfor _ in range({k}):\n    result *= x\nreturn result",
     lambda k, x: x ** k, lambda rng: (rng.randint(-6, 6),)),
    ("keep_below_{k}", "numbers", "Return the numbers in `numbers` that are smaller than {k}, in order.",
     "return [x for x in numbers if x < {k}]",
     lambda k, xs: list(filter(lambda v: v < k, xs)), lambda rng: (_ints(rng),)),
    ("clamp_to_{k}", "x", "Clamp x to the range [0, {k}]: below 0 gives 0, above {k} gives {k}.",
     "if x < 0:\n    return 0\nif x > {k}:\n    return {k}\nreturn x",
     lambda k, x: sorted([0, x, k])[1], lambda rng: (rng.randint(-30, 60),)),
    ("repeat_word_{k}_times", "word", "Return `word` repeated {k} times, separated by single spaces.",
     "return ' '.join([word] * {k})",
     lambda k, w: (w + " ") * (k - 1) + w, lambda rng: (_word(rng),)),
    ("count_letter_runs_longer_than_{k}", "text",
     "Count the maximal runs of one repeated character in `text` that are longer than {k}.",
     "count = 0\nrun = 0\nfor i, ch in enumerate(text):\n    run = run + 1 if i and ch == text[i - 1] else 1\n"
     "    if run == {k} + 1:\n        count += 1\nreturn count",
     lambda k, t: sum(1 for g in __import__("itertools").groupby(t) if len(list(g[1])) > k),
     lambda rng: ("".join(rng.choice("aab") * rng.randint(1, 4) for _ in range(rng.randint(0, 6))),)),
    ("sum_of_first_{k}_squares", "offset",
     "Return the sum of (i + offset) ** 2 for i = 1, ..., {k}.",
     "total = 0\nfor i in range(1, {k} + 1):\n    total += (i + offset) ** 2\nreturn total",
     lambda k, o: sum((i + o) * (i + o) for i in range(1, k + 1)), lambda rng: (rng.randint(-5, 5),)),
    ("every_{k}th_item", "items", "Return every {k}th item of `items`, starting with the first.",
     "return items[::{k}]",
     lambda k, xs: [x for i, x in enumerate(xs) if i % k == 0], lambda rng: (_ints(rng, 0, 9, rng.randint(0, 12)),)),
    ("is_divisible_by_{k}", "x", "Return True if x is divisible by {k}, otherwise False.",
     "return x % {k} == 0", lambda k, x: (x // k) * k == x, lambda rng: (rng.randint(-100, 100),)),
    ("count_words_longer_than_{k}", "sentence", "Count the words in `sentence` that have more than {k} letters.",
     "return len([w for w in sentence.split() if len(w) > {k}])",
     lambda k, t: sum(len(w) > k for w in t.split(" ") if w),
     lambda rng: (" ".join(_word(rng) for _ in range(rng.randint(0, 6))),)),
    ("last_{k}_items", "items", "Return the last {k} items of `items` (all of them if there are fewer).",
     "if len(items) <= {k}:\n    return list(items)\nreturn items[len(items) - {k}:]",
     lambda k, xs: xs[max(0, len(xs) - k):], lambda rng: (_ints(rng, 0, 9, rng.randint(0, 10)),)),
    ("replace_{k}_with_zero", "numbers", "Return a copy of `numbers` where every {k} is replaced by 0.",
     "result = []\nfor x in numbers:\n    result.append(0 if x == {k} else x)\nreturn result",
     lambda k, xs: [x * (x != k) for x in xs], lambda rng: (_ints(rng, 0, 15),)),
    ("smallest_above_{k}", "numbers",
     "Return the smallest number in `numbers` greater than {k}, or None if there is none.",
     "best = None\nfor x in numbers:\n    if x > {k} and (best is None or x < best):\n        best = x\nreturn best",
     lambda k, xs: min((x for x in xs if x > k), default=None), lambda rng: (_ints(rng, 0, 30),)),
    ("digit_sum_times_{k}", "x", "Return the sum of the decimal digits of abs(x), multiplied by {k}.",
     "total = 0\nx = abs(x)\nwhile x > 0:\n    total += x % 10\n    x //= 10\nreturn total * {k}",
     lambda k, x: k * sum(int(c) for c in str(abs(x))), lambda rng: (rng.randint(-9999, 9999),)),
]
PY_TASK_NAMES = {"count_words_longer_than_{k}": (1, 6), "last_{k}_items": (1, 6), "replace_{k}_with_zero": (1, 15),
                 "smallest_above_{k}": (0, 25), "digit_sum_times_{k}": (2, 20),"count_letter_runs_longer_than_{k}": (0, 3), "power_of_{k}": (2, 5), "every_{k}th_item": (2, 4),
                 "repeat_word_{k}_times": (2, 4), "sum_of_first_{k}_squares": (2, 9)}


def python_function(rng: random.Random) -> dict:
    """A small function with a docstring and an example, its body, and asserts computed by a reference."""
    name_t, args, doc_t, body_t, reference, make_input = rng.choice(PY_TASKS)
    lo, hi = PY_TASK_NAMES.get(name_t, (2, 25))
    k = rng.randint(lo, hi)
    name = name_t.format(k=k)
    cases = []
    for _ in range(rng.randint(3, 5)):
        inp = make_input(rng)
        cases.append((inp, reference(k, *inp)))
    example_in, example_out = cases[0]
    call = f"{name}({', '.join(map(repr, example_in))})"
    doc = doc_t.format(k=k)
    body = "\n".join("    " + line for line in body_t.format(k=k).split("\n"))
    source = (f"def {name}({args}):\n    \"\"\"{doc}\n\n    >>> {call}\n    {example_out!r}\n    \"\"\"\n{body}\n")
    tests = "\n".join(f"assert {name}({', '.join(map(repr, i))}) == {o!r}" for i, o in cases)
    text = source + "\n\n" + tests + "\n"
    # The split follows the function (group), so held-out functions never appear in train, even with other tests.
    return {"text": text, "key": f"py:{text}", "group": f"py:{name}:{body_t}", "entry_point": name,
            "check": text}


# --- short explanatory passages -------------------------------------------------------------------------------

def passage(rng: random.Random) -> dict:
    """A short textbook paragraph explaining one idea with worked numbers."""
    topic = rng.choice(["multiplication", "even_odd", "rectangle", "remainder", "list", "loop", "percent",
                        "average"])
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    if topic == "multiplication":
        text = (f"Multiplication is repeated addition. When we write {a} * {b}, we mean {b} added together {a} "
                f"times: {' + '.join([str(b)] * a)} = {a * b}. This is why {a} * {b} = {a * b}. Multiplication "
                f"also does not care about order, so {b} * {a} is {a * b} too.")
        check = f"assert {a} * {b} == {a * b} == {'+'.join([str(b)] * a)}\n"
    elif topic == "even_odd":
        x = rng.randint(10, 99)
        parity = "even" if x % 2 == 0 else "odd"
        text = (f"A whole number is even when it can be split into two equal groups, and odd when one is left "
                f"over. To check {x}, divide it by 2: {x} = 2 * {x // 2} + {x % 2}. The remainder is {x % 2}, "
                f"so {x} is {parity}. A quick rule: a number is even exactly when its last digit is 0, 2, 4, 6 "
                f"or 8.")
        check = f"assert {x} == 2 * {x // 2} + {x % 2}\n"
    elif topic == "rectangle":
        text = (f"The area of a rectangle is its length times its width, and its perimeter is the distance "
                f"around it. A rectangle {a} meters long and {b} meters wide covers {a} * {b} = {a * b} square "
                f"meters. Walking around it, you cover {a} + {b} + {a} + {b} = {2 * (a + b)} meters, which is "
                f"the same as 2 * ({a} + {b}).")
        check = f"assert {a} * {b} == {a * b} and 2 * ({a} + {b}) == {2 * (a + b)}\n"
    elif topic == "remainder":
        x = rng.randint(20, 99)
        text = (f"When a number does not divide evenly, the part left over is called the remainder. If {x} "
                f"candies are shared among {a} children, each child gets {x // a} candies, because {a} * "
                f"{x // a} = {a * (x // a)}, and {x} - {a * (x // a)} = {x % a} candies are left over. In "
                f"Python, {x} // {a} gives {x // a} and {x} % {a} gives the remainder {x % a}.")
        check = f"assert divmod({x}, {a}) == ({x // a}, {x % a})\n"
    elif topic == "list":
        xs = [rng.randint(1, 9) for _ in range(rng.randint(3, 6))]
        text = (f"In Python, a list keeps several values in order. After xs = {xs}, len(xs) counts {len(xs)} "
                f"items. The first item is at index 0, so xs[0] is {xs[0]}, and the last item, at index -1, "
                f"is {xs[-1]}. The built-in sum() adds the items up: the total here is "
                f"{sum(xs)}.")
        check = f"xs = {xs}\nassert len(xs) == {len(xs)} and xs[0] == {xs[0]} and xs[-1] == {xs[-1]} " \
                f"and sum(xs) == {sum(xs)}\n"
    elif topic == "loop":
        text = (f"A for loop repeats a block of code once for each item. The loop `for i in range({a}):` runs "
                f"{a} times, with i taking the values 0 to {a - 1}. If each pass adds {b} to a total that "
                f"starts at 0, the total after the loop is {a} * {b} = {a * b}.")
        check = f"t = 0\nfor i in range({a}):\n    t += {b}\nassert t == {a * b}\n"
    elif topic == "percent":
        p = rng.choice([10, 20, 25, 50, 75])
        whole = rng.choice([20, 40, 60, 80, 100, 200, 400])
        part = whole * p // 100
        text = (f"Percent means 'out of one hundred'. To find {p}% of {whole}, multiply {whole} by {p} and "
                f"divide by 100: {whole} * {p} / 100 = {part}. So if a class has {whole} students and {p}% of "
                f"them walk to school, {part} students walk.")
        check = f"assert {whole} * {p} // 100 == {part} and {whole} * {p} % 100 == 0\n"
    else:
        xs = [rng.randint(1, 20) for _ in range(rng.randint(2, 5))]
        while sum(xs) % len(xs):
            xs[0] += 1
        text = (f"The average of a set of numbers is their sum divided by how many there are. For the numbers "
                f"{', '.join(map(str, xs))}, the sum is {sum(xs)} and there are {len(xs)} of them, so the "
                f"average is {sum(xs)} / {len(xs)} = {sum(xs) // len(xs)}.")
        check = f"assert sum({xs}) / {len(xs)} == {sum(xs) // len(xs)}\n"
    return {"text": text, "key": f"passage:{text}", "check": check}


MAKERS: dict[str, Callable[[random.Random], dict]] = {
    "arithmetic_easy": arithmetic_easy, "arithmetic_facts": arithmetic_facts,
    "arithmetic": arithmetic, "word_problem": word_problem, "python": python_function, "passage": passage,
    "word_problem_new_phrasing": word_problem_new_phrasing,
}


# --- cleaning a corpus of exercises ----------------------------------------------------------------------------

def clean(docs: list[dict], heldout: dict[str, list[dict]], benchmarks: tuple[str, ...] = ("humaneval",)
          ) -> tuple[list[dict], dict]:
    """Training documents without duplicates and without 13-gram overlap with benchmark files or with our own
    held-out exercises; returns (kept, counts of what went).

    Exact + MinHash near-duplicates (templated exercises differ in a few numbers, so only true repeats are
    near-duplicates at 0.95), then 13-gram overlap with the benchmarks as in phi-1, and with the held-out
    exercises. The held-out split already keeps every held-out exercise out of training; the overlap check adds
    its near-twins, like (a + b) + c for a + b + c. Shorter n-grams would match template phrases ("then Bob gave
    Alice 3 apples, then") and throw away most word problems."""
    from .decontaminate import BenchmarkIndex, DecontaminationReport, decontaminate
    from .dedup import DedupReport, dedup
    dedup_report = DedupReport()
    kept = list(dedup(docs, threshold=0.95, report=dedup_report))
    index, own = BenchmarkIndex(n=13), BenchmarkIndex(n=13)
    for spec in benchmarks:
        index.add_file(spec)
    for kind, records in heldout.items():
        for r in records:
            own.add(f"heldout/{kind}", r["key"], r["text"])
    contam, contam_own = DecontaminationReport(), DecontaminationReport()
    kept = list(decontaminate(decontaminate(kept, index, report=contam), own, report=contam_own))
    return kept, {"dedup": {"exact": dedup_report.exact_duplicates, "near": dedup_report.near_duplicates},
                  "decontaminate": {f"benchmarks ({', '.join(Path(b).name for b in benchmarks)}; 13-gram)":
                                    contam.contaminated,
                                    "held-out exercises (13-gram)": contam_own.contaminated}}


# --- verification by execution --------------------------------------------------------------------------------

def _batch_program(checks: list[str]) -> str:
    """One program running many checks, each in a fresh namespace, printing the indices that fail: one sandbox
    process per batch instead of per exercise."""
    return ("import json\nchecks = " + repr(checks) + "\nfailed = []\n"
            "for i, src in enumerate(checks):\n"
            "    try:\n        exec(compile(src, f'<check {i}>', 'exec'), {'__name__': '__check__'})\n"
            "    except BaseException:\n        failed.append(i)\n"
            "print('FAILED', json.dumps(failed))\n")


def verify(records: list[dict], timeout: float = 30.0, workers: int = 2, batch: int = 200) -> list[bool]:
    """Execute every record's `check` in the sandbox (phikit.sandbox); True where it passed."""
    from phikit.sandbox import run_many

    chunks = [records[i:i + batch] for i in range(0, len(records), batch)]
    results = run_many([_batch_program([r["check"] for r in c]) for c in chunks], timeout=timeout,
                       workers=workers)
    ok: list[bool] = []
    for chunk, res in zip(chunks, results):
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("FAILED ")), None)
        if res.status != "passed" or line is None:
            ok.extend([False] * len(chunk))  # the batch itself broke: count none as verified
            continue
        failed = set(json.loads(line[len("FAILED "):]))
        ok.extend(i not in failed for i in range(len(chunk)))
    return ok


# --- the ablation's contrast: the same exercises as an unfiltered web page would hold them -----------------------

def web_like_mix(textbook: list[dict], seed: int = 0) -> list[dict]:
    """An unfiltered web-like corpus of the same size: boilerplate, answers without reasoning (a fifth of them
    wrong), shuffled fragments and code without tests, mixed with a little of the textbook text."""
    rng = random.Random(seed)
    boiler = ["Click here to subscribe to our newsletter!", "Home | About | Contact | Privacy Policy",
              "Posted by admin on", "Share this: Twitter Facebook", "Copyright 2023 All rights reserved.",
              "Top 10 tips you will not believe", "Sign in to comment", "Related posts:", "Advertisement"]
    out = []
    for r in textbook:
        text = r["text"]
        roll = rng.random()
        if roll < 0.3:
            out.append({"text": "\n".join(rng.choices(boiler, k=rng.randint(3, 8)))})
        elif roll < 0.6 and "Answer:" in text:
            q = text.split("\n")[0]
            ans = text.rsplit("Answer:", 1)[1].strip()
            if rng.random() < 0.2 and ans.lstrip("-").isdigit():
                ans = str(int(ans) + rng.choice([-3, -1, 1, 2, 7]))
            out.append({"text": f"{rng.choice(boiler)}\n{q} {ans}\n{rng.choice(boiler)}"})
        elif roll < 0.8:
            words = text.split()
            rng.shuffle(words)
            out.append({"text": " ".join(words)})
        else:
            out.append({"text": text})
    return out
