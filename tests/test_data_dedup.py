"""dedup and decontaminate catch planted duplicates and planted benchmark passages (recall 100%), and leave a
clean sample alone (no false positives). Clean text: real GSM8K training questions and Python stdlib files."""
from __future__ import annotations

import gzip
import json
import random
import sysconfig
from pathlib import Path

import pytest

from phikit.cli import main
from phikit.data import procedural
from phikit.data.decontaminate import build_index, decontaminate, humaneval_path, DecontaminationReport
from phikit.data.dedup import DedupReport, dedup, jaccard

GSM8K = Path("/work/shared/data/gsm8k")
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _gsm8k(split: str) -> list[dict]:
    path = GSM8K / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stdlib_sample(n: int) -> list[str]:
    files = sorted(p for p in (STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))
    return [p.read_text() for p in files[:n]]


def _near_copy(text: str, rng: random.Random) -> str:
    words = text.split()
    i = rng.randrange(len(words))
    words[i] = words[i] + "s"  # one word changed: still a near-duplicate
    return " ".join(words)


def test_dedup_recall_and_no_false_positives():
    rng = random.Random(0)
    clean = [q["question"] for q in _gsm8k("train")[:300]]
    clean = list(dict.fromkeys(clean))  # the real data itself holds no exact repeats
    docs = [{"text": t, "id": f"clean-{i}"} for i, t in enumerate(clean)]
    long_ones = [t for t in clean if len(t.split()) >= 60][:10]
    plants = [{"text": "  " + t.upper().replace(" ", "\n  ") + "!", "id": f"exact-{i}"}
              for i, t in enumerate(clean[:10])]
    plants += [{"text": _near_copy(t, rng), "id": f"near-{i}"} for i, t in enumerate(long_ones)]
    for p in plants:  # the plants really are near copies by exact Jaccard
        assert p["id"].startswith("exact") or jaccard(p["text"], long_ones[int(p["id"][5:])]) >= 0.8
    report = DedupReport()
    kept = list(dedup(docs + plants, threshold=0.7, report=report))
    removed = {r["id"] for r in report.removed}
    assert removed == {p["id"] for p in plants}  # 100% recall, and no clean document removed
    assert [k["id"] for k in kept] == [d["id"] for d in docs]
    assert report.exact_duplicates == 10 and report.near_duplicates == len(long_ones)


def _humaneval():
    with gzip.open(humaneval_path(), "rt") as f:
        return [json.loads(line) for line in f]


def test_decontaminate_catches_planted_benchmarks(tmp_path):
    rng = random.Random(1)
    he, gsm_test = _humaneval(), _gsm8k("test")
    # Clean: stdlib source and procedural word problems. (GSM8K's own train split is not clean: train item 16
    # shares a 13-gram with test item 633, and decontamination rightly flags it.)
    clean = [{"text": t, "id": f"clean-{i}"} for i, t in enumerate(
        _stdlib_sample(30) + [r["text"] for r in procedural.generate(200, seed=0)])]
    plants = []
    for i, p in enumerate(rng.sample(he, 8)):  # a HumanEval prompt inside other code, re-indented
        body = p["prompt"].replace("    ", "\t")
        plants.append({"text": f"import os\n\n# utilities\n{body}    pass\n", "id": f"he-{i}"})
    for i, q in enumerate(rng.sample(gsm_test, 8)):  # a GSM8K question inside a story
        plants.append({"text": f"Our class solved this one today. {q['question'].lower()} We liked it.",
                       "id": f"gsm-{i}"})
    bench = tmp_path / "gsm8k_test.jsonl"
    bench.write_text("".join(json.dumps(q) + "\n" for q in gsm_test))
    index = build_index(["humaneval", str(bench)], n=13)
    report = DecontaminationReport()
    kept = list(decontaminate(clean + plants, index, report=report))
    assert [k["id"] for k in kept] == [c["id"] for c in clean]  # recall 100%, no false positives
    flagged = {e["id"] for e in report.examples}
    assert flagged == {p["id"] for p in plants}
    assert report.per_benchmark["humaneval"] == 8 and sum(report.per_benchmark.values()) == 16


def test_cli_dedup_and_decontaminate_reports(tmp_path, capsys):
    docs = [{"text": f"The number {i} is written as {i} and read aloud in class every morning today"}
            for i in range(20)]
    docs += [docs[3], {"text": _humaneval()[0]["prompt"]}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert main(["data", "dedup", str(src), "-o", str(tmp_path / "d.jsonl"), "--exact-only"]) == 0
    rep = json.loads((tmp_path / "d.jsonl.report.json").read_text())
    assert rep["exact_duplicates"] == 1 and rep["kept"] == 21
    assert main(["data", "decontaminate", str(tmp_path / "d.jsonl"), "--benchmarks", "humaneval",
                 "--action", "flag", "-o", str(tmp_path / "c.jsonl")]) == 0
    out = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(out) == 21 and out[-1]["contamination"][0]["item"] == "HumanEval/0"
    rep = json.loads((tmp_path / "c.jsonl.report.json").read_text())
    assert rep["contaminated"] == 1 and rep["benchmark_passages"]["humaneval"] > 164


def test_degenerate_settings_are_refused(tmp_path, capsys):
    docs = [{"text": f"document number {i} talks about topic {i * 7}"} for i in range(5)]
    with pytest.raises(ValueError, match="ngram must be at least 1"):  # would call every document a duplicate
        list(dedup(docs, ngram=0))
    with pytest.raises(ValueError, match="num_perm must be at least 2"):
        list(dedup(docs, num_perm=0))
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert main(["data", "dedup", str(f), "--ngram", "0", "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "ngram must be at least 1" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()


def test_every_removal_points_at_a_kept_document():
    base = " ".join(f"word{i}" for i in range(60))
    near = base.replace("word30", "other")  # a near copy of the first document
    docs = [{"text": base}, {"text": near}, {"text": near.upper()}]  # the third is an exact copy of the second
    report = DedupReport()
    kept = list(dedup(docs, threshold=0.7, report=report))
    assert kept == docs[:1] and [r["duplicate_of"] for r in report.removed] == [0, 0]


def _edited_corpus(seed: int, n_base: int = 40) -> list[str]:
    """Random-word documents and copies of them with 1-8 words replaced: similarities spread across (0, 1)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    docs = []
    for _ in range(n_base):
        base = [rng.choice(vocab) for _ in range(rng.randrange(20, 60))]
        docs.append(" ".join(base))
        for _ in range(3):
            copy = list(base)
            for _ in range(rng.randrange(1, 9)):
                copy[rng.randrange(len(copy))] = rng.choice(vocab)
            docs.append(" ".join(copy))
    rng.shuffle(docs)
    return docs


@pytest.mark.parametrize("threshold,num_perm", [(0.8, 128), (0.6, 64), (0.5, 32)])
def test_near_dedup_equals_brute_force_over_all_pairs(threshold, num_perm):
    from phikit.data.dedup import shingles

    docs = _edited_corpus(seed=int(threshold * 10) + num_perm)
    sets = [shingles(d) for d in docs]
    # Reference: each document against every earlier kept one by exact Jaccard similarity (Python sets);
    # removed when the best reaches the threshold, pointing at the earliest of the most similar.
    kept, expected = [], {}
    for i, s in enumerate(sets):
        best = max(((len(s & sets[j]) / len(s | sets[j]), -j) for j in kept), default=(0.0, 0))
        if best[0] >= threshold:
            expected[i] = -best[1]
        else:
            kept.append(i)
    report = DedupReport()
    list(dedup(({"text": d} for d in docs), threshold=threshold, num_perm=num_perm, report=report))
    assert {r["index"]: r["duplicate_of"] for r in report.removed} == expected


def _pair_at(similarity: float, rng: random.Random) -> tuple[str, str]:
    """Two random-word documents whose 5-gram shingle sets have exactly the given Jaccard similarity: the second
    is the first with a tail of new words, each adding one shingle to the union."""
    words = [f"w{rng.randrange(10**9)}" for _ in range(400)]
    shared = len(words) - 4  # shingles of the first document
    extra = round(shared / similarity) - shared
    return " ".join(words), " ".join(words + [f"x{rng.randrange(10**9)}" for _ in range(extra)])


@pytest.mark.parametrize("similarity,removed", [(0.81, True), (0.8, True), (0.79, False)])
def test_a_pair_just_above_the_threshold_is_removed_and_just_below_kept(similarity, removed, tmp_path):
    rng = random.Random(int(similarity * 100))
    a, b = _pair_at(similarity, rng)
    assert jaccard(a, b) == pytest.approx(similarity, abs=0.002)
    # among unrelated documents, on the one-process path and as tasks
    docs = [{"text": " ".join(f"u{rng.randrange(10**9)}" for _ in range(50))} for _ in range(20)]
    docs[5:5] = [{"text": a}]
    docs[12:12] = [{"text": b}]
    report = DedupReport()
    list(dedup(docs, threshold=0.8, report=report))
    assert [(r["index"], r["duplicate_of"]) for r in report.removed] == ([(12, 5)] if removed else [])
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert main(["data", "dedup", str(f), "--tasks", "3", "--output", str(tmp_path / "o.jsonl")]) == 0
    tasks = json.loads((tmp_path / "o.jsonl.report.json").read_text())
    assert [(r["index"], r["duplicate_of"]) for r in tasks["removed"]] == ([(12, 5)] if removed else [])


def test_copies_differing_only_in_case_are_exact_duplicates():
    docs = [{"text": "Die Straße ist lang und schön, sagte er."},
            {"text": "DIE STRASSE IST LANG UND SCHÖN, SAGTE ER!"},
            {"text": "ﬁnd the ﬁle"}, {"text": "FIND THE FILE"}]
    report = DedupReport()
    assert list(dedup(docs, report=report)) == [docs[0], docs[2]]
    assert report.exact_duplicates == 2


def test_decontamination_equals_brute_force_item_overlap(tmp_path):
    import re
    import unicodedata

    n = 6
    rng = random.Random(3)
    vocab = [f"v{i}" for i in range(40)]
    items = [{"id": f"b/{i}", "question": " ".join(rng.choice(vocab) for _ in range(rng.randrange(3, 15))),
              "meta": {"hint": "shared hint text that every single item carries"}} for i in range(30)]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in items))
    index = build_index([str(bench)], n=n)

    def grams(text):  # reference tokenization, written independently: NFKC, casefold, NFKC, \w+ runs
        t = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
        w = re.findall(r"\w+", t)
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

    docs = []
    for _ in range(60):
        words = [rng.choice(vocab) for _ in range(rng.randrange(0, 25))]
        if rng.random() < 0.3:
            words += "Shared HINT, text: that".split()
        docs.append(rng.choice([" ", "\n", ", ", "\t"]).join(w.upper() if rng.random() < 0.3 else w for w in words))
    docs += ["ＳＨＡＲＥＤ ｈｉｎｔ text that every single item", "ﬁ " + items[0]["question"]]
    for d in docs:
        expected = {r["id"] for r in items
                    if any(grams(s) & grams(d) for s in (r["question"], r["meta"]["hint"]))}
        assert {m["item"] for m in index.matches(d)} == expected, d
    assert {m["item"] for m in index.matches(docs[-2])} == {r["id"] for r in items}
