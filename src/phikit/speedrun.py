"""The speedrun: from nothing to a phi model you can talk to, with a report, in one resumable command.

Stages (each leaves `stages/<name>.json` in the run directory; a rerun skips finished stages):
  data       procedural textbook exercises (and a teacher's, with --teacher-url), dedup, decontaminate
  tokenizer  a byte-level BPE trained on the corpus (digits split), or the phi tokenizer (by preset)
  pack       token shards with a held-out split
  pretrain   a small phi model on the shards (the shared training loop)
  sft        ChatML instruction tuning: the exercises as chats, plus greetings, identity, refusals, follow-ups
  eval       held-out arithmetic and word problems (also in unseen phrasings), code pass@1 in the sandbox,
             perplexity, multiple choice; untrained baseline; a scripted conversation with the chat model
  ablation   (--ablation) the same compute on an unfiltered web-like mix, scored the same way
  report     report.md with tables, loss curves, the conversation, samples in every prompt format
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .files import write_json, write_text_atomic

EVAL_KINDS = ("arithmetic_easy", "arithmetic", "word_problem", "word_problem_new_phrasing", "python")
# The report's "talk to it" section: fresh chats, except the follow-up, which continues the word problem.
TALK_SCRIPT = [["Hello! What can you do?"], ["What is 7 + 5 * 2?"],
               ["Maya has 7 apples. Maya buys 5 more apples. How many apples does Maya have?",
                "And if Maya buys 3 more?"],
               ["Write a Python function that returns the square of a number."],
               ["What is the capital of Australia?"]]
GSM8K_TEST = Path(__file__).parent / "eval" / "assets" / "gsm8k_test.jsonl.gz"  # decontamination reference
STAGES = ("data", "tokenizer", "pack", "pretrain", "sft", "eval", "ablation", "report")


@dataclass
class SpeedrunPreset:
    """Sizes for one speedrun scale. The GPU presets are meant for torchrun; on a CPU they run, slowly."""
    model: dict[str, Any]
    tokenizer: str                      # "bpe" (trained, digits split) or "phi"
    bpe_vocab: int = 2048
    docs: dict[str, int] = field(default_factory=dict)   # train documents per procedural kind
    heldout: int = 200                  # held-out exercises per kind for evaluation
    seq_len: int = 256
    batch: int = 16
    lr: float = 2e-3
    optimizer: str = "adamw"            # adamw | muon (see TrainConfig.optimizer)
    muon_lr: float = 0.02
    sft_lr: float | None = None         # SFT's peak learning rate (AdamW); None: half of lr
    pretrain_share: float = 0.70        # share of the time budget given to pretraining
    sft_share: float = 0.14
    precision: str = "fp32"


PRESETS: dict[str, SpeedrunPreset] = {
    # A smoke test of every stage in about a minute (the numbers mean little).
    "micro": SpeedrunPreset(
        model=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                   partial_rotary_factor=0.5, max_position_embeddings=256),
        tokenizer="bpe", bpe_vocab=512,
        docs={"arithmetic_easy": 300, "arithmetic_facts": 200, "arithmetic": 100, "word_problem": 200, "python": 100,
              "passage": 50},
        heldout=12, seq_len=128, batch=8, lr=3e-3, optimizer="muon"),
    "cpu-tiny": SpeedrunPreset(
        model=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                   partial_rotary_factor=0.5, max_position_embeddings=512, resid_pdrop=0.0),
        tokenizer="bpe", bpe_vocab=2048,
        docs={"arithmetic_easy": 12000, "arithmetic_facts": 8000, "arithmetic": 3000, "word_problem": 3000,
              "python": 2000, "passage": 1500},
        heldout=60, seq_len=256, batch=16, lr=2e-3, optimizer="muon"),
    "gpu-small": SpeedrunPreset(
        model=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   partial_rotary_factor=0.5, max_position_embeddings=2048),
        tokenizer="phi", docs={"arithmetic": 400_000, "word_problem": 200_000, "python": 100_000, "passage": 50_000},
        heldout=500, seq_len=1024, batch=64, lr=6e-4, precision="bf16"),
    "phi-1_5": SpeedrunPreset(
        model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                   partial_rotary_factor=0.5, max_position_embeddings=2048),
        tokenizer="phi", docs={"arithmetic": 4_000_000, "word_problem": 2_000_000, "python": 1_000_000,
                               "passage": 500_000},
        heldout=1000, seq_len=2048, batch=256, lr=2e-4, precision="bf16"),
}


class Speedrun:
    def __init__(self, out: str | Path = "runs/speedrun", minutes: float = 10.0, preset: str = "cpu-tiny",
                 teacher_url: str | None = None, teacher_model: str = "teacher", ablation: bool = False,
                 seed: int = 0, log: Callable[[str], None] = print) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown speedrun preset {preset!r}: choose one of {', '.join(PRESETS)}")
        if minutes <= 0:
            raise ValueError(f"--minutes must be positive, got {minutes}")
        self.out = Path(out)
        self.minutes = minutes
        self.preset_name = preset
        self.preset = PRESETS[preset]
        self.teacher_url, self.teacher_model = teacher_url, teacher_model
        self.ablation = ablation
        self.seed = seed
        self.log = log
        self.started = time.time()

    # ------------------------------------------------------------------ stage bookkeeping
    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def done(self, stage: str) -> dict | None:
        marker = self.path("stages", f"{stage}.json")
        return json.loads(marker.read_text()) if marker.exists() else None

    def finish(self, stage: str, result: dict, seconds: float) -> dict:
        marker = self.path("stages", f"{stage}.json")
        marker.parent.mkdir(parents=True, exist_ok=True)
        record = {"stage": stage, "seconds": round(seconds, 1), **result}
        write_json(marker, record)
        return record

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        plan = {"preset": self.preset_name, "minutes": self.minutes, "seed": self.seed, "ablation": self.ablation,
                "teacher_url": self.teacher_url, "teacher_model": self.teacher_model, "sizes": asdict(self.preset)}
        old = json.loads(self.path("speedrun.json").read_text()) if self.path("speedrun.json").exists() else {}
        if old and any(self.path("stages").glob("*.json")):
            # Finished stages are reused as they are: with other settings the report would mix two runs.
            changed = [k for k in ("preset", "minutes", "seed", "teacher_url", "teacher_model")
                       if k in old and old[k] != plan[k]]
            if changed:
                was = ", ".join(f"--{k.replace('_', '-')} {old[k]}" for k in changed)
                raise ValueError(f"{self.out} holds a speedrun made with {was}: rerun it with those settings to "
                                 f"resume it, pass --fresh to start over, or choose another --out")
            plan["ablation"] = self.ablation or bool(old.get("ablation"))
        write_text_atomic(self.path("speedrun.json"), json.dumps(plan, indent=2) + "\n")
        results = {}
        stages = [s for s in STAGES if s != "ablation" or self.ablation]
        ran = False
        for i, stage in enumerate(stages, 1):
            previous = self.done(stage)
            if previous is not None and not (stage == "report" and ran):  # new results: write the report again
                self.log(f"[{i}/{len(stages)}] {stage}: done already ({previous['seconds']} s), skipping")
                results[stage] = previous
                continue
            self.log(f"[{i}/{len(stages)}] {stage} ...")
            t0 = time.time()
            result = getattr(self, f"stage_{stage}")(results)
            results[stage] = self.finish(stage, result, time.time() - t0)
            ran = True
            self.log(f"[{i}/{len(stages)}] {stage}: finished in {time.time() - t0:.0f} s")
        return results

    def budget(self, share: float) -> float:
        """Seconds of the time budget given to a stage."""
        return self.minutes * 60 * share

    # ------------------------------------------------------------------ stages
    def stage_data(self, results: dict) -> dict:
        from .data import procedural
        from .data.conversations import sft_mix
        from .data.io import write_records

        docs = []
        for kind, n in self.preset.docs.items():
            docs += procedural.generate(n, "train", seed=self.seed, kinds=(kind,))
        teacher_docs = self._teacher_docs() if self.teacher_url else []
        docs += teacher_docs
        random.Random(self.seed).shuffle(docs)
        heldout = {kind: procedural.generate(self.preset.heldout, "heldout", seed=self.seed, kinds=(kind,))
                   for kind in EVAL_KINDS}
        kept, cleaning = procedural.clean(docs, heldout, benchmarks=("humaneval", str(GSM8K_TEST)))
        data_dir = self.path("data")
        data_dir.mkdir(parents=True, exist_ok=True)
        write_records(data_dir / "train.jsonl", ({"text": r["text"], "kind": r.get("kind", "teacher")} for r in kept))
        write_records(data_dir / "heldout.jsonl", (r for rs in heldout.values() for r in rs))
        sft = sft_mix(kept, self.seed)
        write_records(data_dir / "sft.jsonl", sft)
        return {"documents": len(docs), "teacher_documents": len(teacher_docs), "kept": len(kept), **cleaning,
                "heldout": {k: len(v) for k, v in heldout.items()}, "sft": dict(Counter(c["kind"] for c in sft))}

    def _teacher_docs(self) -> list[dict]:
        """Textbook passages from an OpenAI-compatible teacher (resumable append-only file)."""
        import asyncio

        from .data.io import read_records
        from .data.synth import Teacher, TeacherError, api_key_from_env, build_prompts, load_topics, synthesize
        out = self.path("data", "teacher.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        prompts = build_prompts(load_topics(), limit=max(10, self.preset.docs.get("passage", 100) // 10),
                                seed=self.seed)
        teacher = Teacher(base_url=self.teacher_url, model=self.teacher_model,
                          api_key=api_key_from_env("PHIKIT_TEACHER_API_KEY"))
        stats = asyncio.run(synthesize(prompts, out, teacher, concurrency=8, seed=self.seed))
        if stats.failed:  # finishing the stage now would leave these passages out for good
            raise TeacherError(f"{stats.failed} of {stats.prompts} teacher prompts are unanswered: rerun the "
                               f"speedrun to ask for them again")
        return [{"text": r["text"], "kind": "teacher"} for r in read_records([out])]

    def stage_tokenizer(self, results: dict) -> dict:
        from .tokenizer import build_phi_tokenizer, iter_text_files, train_bpe
        out = self.path("tokenizer")
        if self.preset.tokenizer == "phi":
            tok = build_phi_tokenizer()
        else:
            tok = train_bpe(iter_text_files([self.path("data", "train.jsonl")]), self.preset.bpe_vocab,
                            split_digits=True)
        tok.save(out)
        return {"kind": self.preset.tokenizer, "vocab": len(tok)}

    def stage_pack(self, results: dict) -> dict:
        from .data.pack import pack
        _quiet_datatrove()
        index = pack([self.path("data", "train.jsonl")], self.path("shards"), tokenizer_path=self.path("tokenizer"),
                     val_fraction=0.02, workers=1)
        return {"train_tokens": sum(s["tokens"] for s in index["splits"]["train"]),
                "val_tokens": sum(s["tokens"] for s in index["splits"]["val"]), "documents": index["documents"]}

    def _model_overrides(self) -> dict:
        from .tokenizer import Tokenizer
        vocab = len(Tokenizer.from_file(self.path("tokenizer")))
        rows = 51200 if self.preset.tokenizer == "phi" else int(math.ceil((vocab + 2) / 64) * 64)
        return {**self.preset.model, "vocab_size": rows, "tokenizer_vocab_size": vocab}

    def stage_pretrain(self, results: dict) -> dict:
        return self._pretrain(self.path("shards"), self.path("pretrain"), self.path("model-base"),
                              self.budget(self.preset.pretrain_share))

    def _pretrain(self, shards: Path, run_dir: Path, export_dir: Path, seconds: float,
                  max_steps: int | None = None) -> dict:
        """Pretrain with the shared loop for about `seconds` (steps set by a throughput probe), then export."""
        import torch

        from .tokenizer import Tokenizer
        from .train.budget import planned_steps, probe_step_seconds
        from .train.config import TrainConfig
        from .train.launch import run_torchrun
        from .train.pretrain import run_pretraining
        cfg = TrainConfig(model="tiny", model_config=self._model_overrides(), data=str(shards),
                          seq_len=self.preset.seq_len, global_batch_size=self.preset.batch,
                          micro_batch_size=self.preset.batch, lr=self.preset.lr, schedule="cosine",
                          optimizer=self.preset.optimizer, muon_lr=self.preset.muon_lr,
                          precision=self.preset.precision, out_dir=str(run_dir), eval_every=50, eval_sequences=32,
                          checkpoint_every=10, keep_last=1, tensorboard=False, seed=self.seed, max_steps=10)
        if max_steps is None:
            def measure() -> int:
                step_seconds = probe_step_seconds(cfg)
                steps = max(20, int(seconds / step_seconds))
                self.log(f"  {step_seconds * 1000:.0f} ms/step measured: {steps} steps fit in {seconds:.0f} s")
                return steps
            max_steps = planned_steps(self.path("plans", f"{run_dir.name}.json"), measure)
        cfg.max_steps = max_steps
        cfg.warmup_steps = min(50, max_steps // 10)
        cfg.checkpoint_every = max(5, max_steps // 5)  # a killed run loses at most a fifth of its steps
        cfg.validate()
        resume = (run_dir / "checkpoints").is_dir()
        gpus = torch.cuda.device_count()
        if gpus > 1 and self.preset_name != "cpu-tiny":
            cfg.strategy = "fsdp" if self.preset_name == "phi-1_5" else "ddp"
            summary = run_torchrun(cfg, gpus, resume, log=self.log)
        else:
            summary = run_pretraining(cfg, resume=resume, export=True)
        if summary["status"] != "completed":
            raise RuntimeError(f"pretraining {summary['status']}: rerun the speedrun to resume it")
        if export_dir.exists():
            shutil.rmtree(export_dir)
        os.replace(summary["model_dir"], export_dir)
        Tokenizer.from_file(self.path("tokenizer")).save(export_dir)  # tokenizer_config.json too, not only tokenizer.json
        return {"steps": summary["step"], "tokens": summary["tokens"], "tokens_per_second": summary["tokens_per_s"],
                "final_loss": summary.get("loss"), "val_loss": summary.get("val_loss"),
                "unigram_loss": summary.get("unigram_loss"), "mfu": summary.get("mfu"),
                "parameters": summary.get("parameters")}

    def stage_sft(self, results: dict) -> dict:
        """ChatML instruction tuning of the pretrained model on conversations made from the corpus."""
        from .train.budget import planned_steps, probe_step_seconds
        from .train.config import TrainConfig
        from .train.sft import SFTConfig, run_sft
        run_dir = self.path("sft-run")
        probe = TrainConfig(model="tiny", model_config=self._model_overrides(), data="-", seq_len=self.preset.seq_len,
                            global_batch_size=self.preset.batch, micro_batch_size=self.preset.batch)
        seconds = self.budget(self.preset.sft_share)
        steps = planned_steps(self.path("plans", "sft-run.json"),
                              lambda: max(20, int(seconds / probe_step_seconds(probe))))
        cfg = SFTConfig(model=str(self.path("model-base")), data=str(self.path("data", "sft.jsonl")),
                        out_dir=str(run_dir), max_length=self.preset.seq_len, batch_size=self.preset.batch,
                        micro_batch_size=self.preset.batch, max_steps=steps, lr=self.preset.sft_lr or self.preset.lr / 2,
                        warmup_steps=min(20, steps // 10), val_fraction=0.02, eval_every=max(10, steps // 4),
                        checkpoint_every=50, keep_last=1, precision=self.preset.precision, seed=self.seed)
        summary = run_sft(cfg, resume=(run_dir / "checkpoints").is_dir())
        if summary["status"] != "completed":
            raise RuntimeError(f"SFT {summary['status']}: rerun the speedrun to resume it")
        export = self.path("model-chat")
        if export.exists():
            shutil.rmtree(export)
        shutil.copytree(run_dir / "model", export)
        return {"steps": summary["step"], "tokens": summary["tokens"], "final_loss": summary.get("loss"),
                "val_loss": summary.get("val_loss"), "examples": summary.get("train_examples")}

    def stage_eval(self, results: dict) -> dict:
        from . import load
        from .eval.exercises import evaluate_exercises
        from .eval.samples import sample_formats, transcript
        from .model import build_model
        base, tok = load(self.path("model-base"))
        chat, chat_tok = load(self.path("model-chat"))
        untrained = build_model(base.config, seed=self.seed + 1).eval()
        heldout = self._heldout()
        scores = {"untrained": evaluate_exercises(untrained, tok, heldout, chat_format=False),
                  "pretrained": evaluate_exercises(base, tok, heldout, chat_format=False),
                  "sft": evaluate_exercises(chat, chat_tok, heldout, chat_format=True)}
        return {"scores": scores, "samples": sample_formats(chat, chat_tok, base, tok),
                "transcript": transcript(chat, chat_tok, TALK_SCRIPT)}

    def stage_ablation(self, results: dict) -> dict:
        """The paper's claim at toy scale: textbook data beats an unfiltered web-like mix at equal compute."""
        from . import load
        from .data.io import read_records, write_records
        from .data.pack import pack
        from .data.procedural import web_like_mix
        from .eval.exercises import evaluate_exercises
        textbook = list(read_records([self.path("data", "train.jsonl")]))
        web = web_like_mix(textbook, seed=self.seed)
        abl = self.path("ablation")
        write_records(abl / "web.jsonl", web)
        _quiet_datatrove()
        pack([abl / "web.jsonl"], abl / "shards", tokenizer_path=self.path("tokenizer"), val_fraction=0.02, workers=1)
        seconds = self.budget(self.preset.pretrain_share) / 2
        steps = None
        arms = {}
        for name, shards in (("textbook", self.path("shards")), ("web-like", abl / "shards")):
            summary = self._pretrain(shards, abl / f"run-{name}", abl / f"model-{name}", seconds, max_steps=steps)
            steps = summary["steps"]  # the second arm gets exactly the same number of steps (same compute)
            model, tok = load(abl / f"model-{name}")
            arms[name] = {"steps": summary["steps"], "tokens": summary["tokens"],
                          **evaluate_exercises(model, tok, self._heldout(), chat_format=False)}
        return {"arms": arms}

    def _heldout(self) -> dict[str, list[dict]]:
        from .data.io import read_records
        out: dict[str, list[dict]] = {}
        for r in read_records([self.path("data", "heldout.jsonl")], text_field=None):
            out.setdefault(r["kind"], []).append(r)
        return out

    def stage_report(self, results: dict) -> dict:
        from .speedrun_report import write_report
        report = write_report(self.out, results, self.minutes, time.time() - self.started)
        return {"report": str(report)}


def _quiet_datatrove() -> None:
    """The speedrun prints its own progress; datatrove's per-task banners would drown it."""
    try:
        from loguru import logger
        logger.disable("datatrove")
    except ImportError:
        pass
