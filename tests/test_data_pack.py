"""Token shards: the contract's index, tokens equal to the phi tokenizer's own, same output for 1 and 2 workers,
a held-out split, resumability, and mixture specs."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from phikit.data import procedural
from phikit.data.pack import pack
from phikit.data.shards import load_mixture, write_mixture
from phikit.data.shards import ShardSet, read_index


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    records = procedural.generate(600, seed=11)
    path.write_text("".join(json.dumps({"text": r["text"], "kind": r["kind"]}) + "\n" for r in records))
    return path, [r["text"] for r in records]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, corpus):
    out = {}
    for workers in (1, 2):
        d = tmp_path_factory.mktemp(f"shards{workers}")
        pack([corpus[0]], d, val_fraction=0.1, tasks=3, workers=workers)
        out[workers] = d
    return out


def test_index_follows_the_contract(packed, phi_tokenizer):
    d = packed[2]
    index = read_index(d)
    assert set(index) >= {"format", "dtype", "eos_id", "vocab_size", "tokenizer", "splits", "documents"}
    assert index["format"] == "phikit-shards-v1" and index["dtype"] == "uint16"
    assert index["eos_id"] == 50256 and index["vocab_size"] == len(phi_tokenizer) == 50295
    assert (d / index["tokenizer"]).exists() and index["documents"] == 600
    for split in ("train", "val"):
        for entry in index["splits"][split]:
            assert set(entry) == {"file", "tokens", "sha256"}
            raw = (d / entry["file"]).read_bytes()
            assert hashlib.sha256(raw).hexdigest() == entry["sha256"] and len(raw) == 2 * entry["tokens"]
    assert 0 < sum(e["tokens"] for e in index["splits"]["val"]) < sum(e["tokens"] for e in index["splits"]["train"])


def test_tokens_match_the_tokenizer_and_workers_do_not_matter(packed, corpus, phi_tokenizer):
    a, b = packed[1], packed[2]
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())
    docs = [tuple(x.tolist()) for split in ("train", "val") for x in ShardSet(a).documents(split)]
    expected = {tuple(phi_tokenizer.backend.encode(t, add_special_tokens=False).ids) for t in corpus[1]}
    assert len(docs) == 600 and set(docs) == expected  # eos after every document, nothing lost or changed
    raw = np.fromfile(a / read_index(a)["splits"]["train"][0]["file"], dtype="<u2")
    assert raw[-1] == 50256
    val = {phi_tokenizer.decode(x.tolist()) for x in ShardSet(a).documents("val")}
    assert val and not val & {phi_tokenizer.decode(x.tolist()) for x in ShardSet(a).documents("train")}


def test_rerun_is_resumable_and_mixture_spec(packed, corpus, tmp_path):
    d = packed[1]
    before = (d / "index.json").read_text()
    pack([corpus[0]], d, val_fraction=0.1, tasks=3, workers=1)  # finished tasks are skipped
    assert (d / "index.json").read_text() == before
    with pytest.raises(ValueError, match="different pack run"):  # never mix shards of two different runs
        pack([corpus[0]], d, val_fraction=0.5, tasks=3, workers=1)
    assert ShardSet(d).verify() == [] and ShardSet(d).num_tokens("train") > 0
    spec = tmp_path / "mix.yaml"
    write_mixture(spec, [(packed[1], 0.8), (packed[2], 0.2)])
    assert load_mixture(spec) == [(packed[1], 0.8), (packed[2], 0.2)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sources": [{"path": str(tmp_path), "weight": 1}]}))
    with pytest.raises(FileNotFoundError, match="index.json missing"):
        load_mixture(bad)


def test_mix_written_from_another_directory_loads(packed, tmp_path, monkeypatch):
    # `phikit data mix data/shards/a=0.8 --output data/mix.yaml` run from the project root: the spec must point
    # at the shards relative to itself, since that is how the trainer reads it.
    import shutil

    from phikit.train.data import Mixture
    root = tmp_path / "proj"
    shutil.copytree(packed[1], root / "data" / "shards" / "a")
    monkeypatch.chdir(root)
    write_mixture("data/mix.yaml", [("data/shards/a", 1.0)])
    assert load_mixture(root / "data" / "mix.yaml")[0][0].resolve() == (root / "data" / "shards" / "a").resolve()
    assert Mixture.from_path(root / "data" / "mix.yaml").sources[0].shards.num_tokens("train") > 0


def test_overwrite_never_deletes_inputs_or_other_directories(tmp_path, capsys):
    from phikit.cli import main
    data = tmp_path / "data"
    data.mkdir()
    corpus = data / "c.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    assert main(["data", "pack", str(corpus), "--output", str(data), "--overwrite"]) == 2
    assert "holds the inputs" in capsys.readouterr().err and corpus.exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("x")
    assert main(["data", "pack", str(corpus), "--output", str(notes), "--overwrite"]) == 2
    assert "not a shard directory" in capsys.readouterr().err and (notes / "keep.txt").exists()
