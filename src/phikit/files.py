"""Every file or directory phikit writes goes through here, under two rules:

1. Whole or not at all: the output is built beside its target (a hidden `.NAME.partial-*` file or directory) and
   moved into place when complete, so a crash or Ctrl-C never leaves half of one.
2. Never destroy what phikit did not make: an existing target is replaced only when it is an output of the same
   kind (a model directory, a GGUF file, a results file ...); anything else is refused in one line saying what is
   there, --force or not.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator


def _has(*names: str, only: tuple[str, ...] | None = None) -> Callable[[Path], bool]:
    """A directory holding one of `names`; with `only`, every entry must also match one of those patterns, so a
    folder of the user's that merely contains, say, a config.json is never taken for phikit's output."""
    def check(p: Path) -> bool:
        if not p.is_dir() or not any((p / n).exists() for n in names):
            return False
        return only is None or all(any(fnmatch.fnmatchcase(e.name, pat) for pat in only) for e in p.iterdir())
    return check


# What phikit (or the Hugging Face hub, for model directories) puts in each kind of directory.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "added_tokens.json", "chat_template.jinja")
_MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "pytorch_model*.bin", "pytorch_model.bin.index.json", "README.md", "LICENSE", "NOTICE.md",
                "*.gitattributes", "CODE_OF_CONDUCT.md", "SECURITY.md", "configuration_*.py", "modeling_*.py",
                *_TOKENIZER_FILES)
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
                  *_TOKENIZER_FILES)
_RUN_FILES = ("config.yaml", "sft_config.json", "dpo_config.json", "data_report.json", "summary.json",
              "metrics.jsonl", "checkpoints", "model", "adapter", "report.md", "*.png", "tensorboard", ".*.partial-*",
              *_TOKENIZER_FILES)


def _starts_with(magic: bytes) -> Callable[[Path], bool]:
    def check(p: Path) -> bool:
        try:
            with open(p, "rb") as f:
                return f.read(len(magic)) == magic
        except OSError:
            return False
    return check


def _json_with(key: str) -> Callable[[Path], bool]:
    """A JSON (or JSON Lines) file whose first object has `key`: the results files phikit writes."""
    def check(p: Path) -> bool:
        try:
            with open(p, encoding="utf-8") as f:
                head = f.read(1 << 20)
            first = json.loads(head if p.suffix == ".json" else head.split("\n", 1)[0])
        except (OSError, ValueError, UnicodeDecodeError):
            return False
        return isinstance(first, dict) and key in first
    return check


# What each kind of output looks like, so that an existing one can be told apart from the user's own files.
KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "model": ("a model directory", _has("config.json", only=_MODEL_FILES)),
    "adapter": ("a LoRA adapter directory", _has("adapter_config.json", only=_ADAPTER_FILES)),
    "tokenizer": ("a tokenizer directory", _has("tokenizer.json", only=_TOKENIZER_FILES)),
    "run": ("a training run directory", _has("checkpoints", "config.yaml", "sft_config.json", "dpo_config.json",
                                            "metrics.jsonl", "summary.json", only=_RUN_FILES)),
    "checkpoint": ("a training checkpoint", _has("manifest.json", "trainer.json")),
    "speedrun": ("a speedrun directory", _has("speedrun.json")),
    "gguf": ("a GGUF file", _starts_with(b"GGUF")),
    "eval-results": ("an evaluation results file", _json_with("tasks")),
    "eval-report": ("an evaluation report", _starts_with(b"# Evaluation")),
    "code-results": ("a code-evaluation results file", _json_with("passed")),
    "file": ("a file phikit wrote", lambda p: p.is_file()),  # files inside outputs phikit already owns
}


FILE_KINDS = {"gguf", "eval-results", "eval-report", "code-results", "file"}


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _contents(path: Path) -> str:
    """A few words on what is at `path`, for the refusal."""
    if path.is_symlink():
        return "a symbolic link"
    if not path.is_dir():
        return "a file"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"a directory holding {shown}"


def is_output(path: str | os.PathLike, kind: str) -> bool:
    """Whether `path` is an output of this kind (and so may be replaced by a new one)."""
    path = Path(path)
    return not path.is_symlink() and KINDS[kind][1](path)


def check_output(path: str | os.PathLike, kind: str, *, force: bool = True, flag: str = "--force",
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, in one line, an output whose writing would destroy something. Nothing there, or an empty
    directory, is fine; an output of the same kind is replaced when `force` (verbs without a replace flag pass
    True: rewriting their own output is their job), else refused naming `flag`; anything else is always refused.
    An output that is, or holds, one of `inputs` is refused too. Run it before the long work starts."""
    given = str(path)
    noun = "file" if kind in FILE_KINDS else "directory"
    path = Path(path).expanduser()
    out = path.resolve()
    for src in map(Path, inputs):
        src = src.expanduser()
        if src.exists() and (src.resolve() == out or out in src.resolve().parents):
            raise ValueError(f"output {given} holds the input {src}: writing there would delete it; choose "
                             f"another output {noun}")
    _check_writable(out.parent, given)
    if noun == "file" and path.is_dir():
        raise ValueError(f"{given} is a directory: give a file name for the output (e.g. {given.rstrip('/')}/"
                         f"results{'.gguf' if kind == 'gguf' else '.json'})")
    if not path.exists() and not path.is_symlink() or _is_empty_dir(path):
        return path
    label = KINDS[kind][0]
    if not is_output(path, kind):
        raise ValueError(f"{given} exists and is not {label} ({_contents(path)}): phikit replaces only its own "
                         f"outputs; choose another output {noun}, or move it away yourself")
    if not force:
        raise ValueError(f"{given} already holds {label}: pass {flag} to replace it, or choose another output {noun}")
    return path


def _check_writable(directory: Path, given: str) -> None:
    """The output is staged in its parent directory: try that now (a read-only place, /proc, a file in the way)
    rather than after the work is done."""
    existing = next(d for d in (directory, *directory.parents) if d.exists())
    if not existing.is_dir():
        raise ValueError(f"cannot write {given}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".phikit-write-check-")
    except OSError as e:
        raise ValueError(f"cannot write {given}: {existing} does not accept new files ({e.strerror}); choose "
                         "another output") from e
    os.close(fd)
    os.unlink(probe)


def _target(path: str | os.PathLike) -> Path:
    # Resolved, so that `.` or `dir/..` get a real name for the staging place beside them.
    return Path(path).expanduser().resolve()


def _readable(path: Path) -> None:
    """Give what mkstemp/mkdtemp made private (0600/0700) the permissions of anything the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    if path.is_dir():
        path.chmod(0o777 & ~umask)
        for child in path.rglob("*"):
            child.chmod((0o777 if child.is_dir() else 0o666) & ~umask)
    else:
        path.chmod(0o666 & ~umask)


def move_into_place(staged: str | os.PathLike, target: str | os.PathLike, kind: str) -> None:
    """Swap a complete staged output in; the output it replaces goes only after the new one is in place."""
    staged, target = Path(staged), _target(target)
    _readable(staged)
    if not (target.exists() or target.is_symlink()) or (staged.is_file() and target.is_file()
                                                         and is_output(target, kind)):
        os.replace(staged, target)  # atomic for files, and for a directory onto nothing
        return
    if not (_is_empty_dir(target) or is_output(target, kind)):  # checked again: it may have changed meanwhile
        check_output(target, kind)
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(target: str | os.PathLike, kind: str) -> Iterator[Path]:
    """`with staged_dir(out, "model") as tmp:` write into tmp; on success it becomes `out` (an old output of the
    same kind is replaced, anything else refused), on failure it is removed and `out` is as it was."""
    target = _target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        move_into_place(tmp, target, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_file(target: str | os.PathLike, kind: str = "file") -> Iterator[Path]:
    """`with staged_file(out) as tmp:` write the file tmp (it keeps out's suffix, for writers that go by it);
    when the block ends it replaces `out` whole, synced to disk; on failure it is removed."""
    target = _target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.partial-", suffix=target.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # else a crash right after the rename can leave an empty file
        move_into_place(tmp, target, kind)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, kind: str = "file") -> None:
    """Write `path` whole or not at all (configs, reports, summaries)."""
    with staged_file(path, kind) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data, kind: str = "file") -> None:
    """JSON, indented, whole or not at all."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", kind)
