"""The docs' quick starts that need no network and no GPU run as pasted, in order, on tiny sizes."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from phikit.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
ROOT = DOCS.parent


def bash_blocks(doc: str) -> list[list[str]]:
    """The command lines of each ```bash block of a doc page (comments dropped, `\\` continuations joined)."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines = body.replace("\\\n", " ").splitlines()
        blocks.append([shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)])
    return blocks


def run(argv: list[str]) -> None:
    assert argv[0] == "phikit", argv
    assert main(argv[1:]) == 0, argv


def test_training_quick_start_runs_as_pasted(tmp_path, monkeypatch, capsys):
    from phikit.data import procedural
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    with open("corpus.jsonl", "w") as f:
        for rec in procedural.generate(400, "train", seed=0):
            f.write(json.dumps({"text": rec["text"]}) + "\n")
    # Tiny sizes: the same commands, with a run of a few short steps instead of cpu-tiny's 300.
    tiny = ["max_steps=3", "warmup_steps=1", "seq_len=64", "eval_every=0", "checkpoint_every=3", "eval_sequences=2"]
    for argv in bash_blocks("training.md")[0]:
        if argv[1] == "train" and "--export" not in argv:
            flags = argv.index("--resume") if "--resume" in argv else len(argv)
            argv = argv[:flags] + tiny + argv[flags:]
        run(argv)
    assert len(json.loads(Path("tok/tokenizer.json").read_text())["model"]["vocab"]) <= 4096
    assert (tmp_path / "runs/tiny-hf/config.json").is_file()
    # The exported model's context is cpu-tiny's; sft's --max-length defaults to it instead of refusing it.
    context = json.loads(Path("runs/tiny-hf/config.json").read_text())["max_position_embeddings"]
    Path("chats.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}) + "\n"
        for i in range(8)))
    run(["phikit", "sft", "--model", "runs/tiny-hf", "--data", "chats.jsonl", "--out", "runs/sft", "--max-steps", "1",
         "--batch-size", "4", "--micro-batch-size", "4"])
    config = json.loads(Path("runs/sft/sft_config.json").read_text())
    assert config["max_length"] == context and (tmp_path / "runs/sft/model/config.json").is_file()
    capsys.readouterr()


def test_every_quick_start_verb_exists():
    # The pages' other quick starts need real checkpoints, a teacher or GPUs: their verbs and flags must still parse.
    from phikit.cli import VERBS, build_parser
    for doc in ("data.md", "model.md", "serving.md", "speedrun.md", "training.md"):
        for block in bash_blocks(doc):
            for argv in block:
                if argv[0] != "phikit":
                    continue
                assert argv[1] in VERBS, (doc, argv)
                build_parser(argv[1]).parse_args(argv[1:])  # argparse exits on an unknown flag
