"""The speedrun: from nothing to a phi model you can talk to, with a report, in one resumable command.

Stages (each leaves `stages/<name>.json` in the run directory; a rerun skips finished stages):
  data       procedural textbook exercises (and a teacher's, with --teacher-url), dedup, decontaminate
  tokenizer  a byte-level BPE trained on the corpus (digits split), or the phi tokenizer (by preset)
  pack       token shards with a held-out split
  pretrain   a small phi model on the shards (the shared training loop)
  sft        ChatML instruction tuning on generated conversations
  eval       held-out arithmetic, code pass@1 in the sandbox, perplexity, multiple choice; untrained baseline
  ablation   (--ablation) the same compute on an unfiltered web-like mix, scored the same way
  report     report.md with tables, loss curves, samples in every prompt format
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .files import write_json, write_text_atomic

EVAL_KINDS = ("arithmetic_easy", "arithmetic", "word_problem", "python")
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
        from .data.decontaminate import BenchmarkIndex, DecontaminationReport, decontaminate
        from .data.dedup import DedupReport, dedup
        from .data.io import write_records

        docs = []
        for kind, n in self.preset.docs.items():
            docs += procedural.generate(n, "train", seed=self.seed, kinds=(kind,))
        teacher_docs = self._teacher_docs() if self.teacher_url else []
        docs += teacher_docs
        random.Random(self.seed).shuffle(docs)
        heldout = {kind: procedural.generate(self.preset.heldout, "heldout", seed=self.seed, kinds=(kind,))
                   for kind in EVAL_KINDS}
        # Exact + MinHash near-duplicates (templated exercises differ in a few numbers, so only true
        # repeats are near-duplicates at 0.95), then 13-gram overlap with HumanEval and GSM8K as in phi-1,
        # and with our own held-out exercises. The held-out split already keeps every held-out exercise out of
        # training; the overlap check adds its near-twins, like (a + b) + c for a + b + c. Shorter n-grams would
        # match template phrases ("then Bob gave Alice 3 apples, then") and throw away most word problems.
        dedup_report = DedupReport()
        kept = list(dedup(docs, threshold=0.95, report=dedup_report))
        index = BenchmarkIndex(n=13)
        index.add_file("humaneval")
        gsm8k = _gsm8k_file()
        if gsm8k:
            index.add_file(str(gsm8k))
        own = BenchmarkIndex(n=13)
        for kind, recs in heldout.items():
            for r in recs:
                own.add(f"heldout/{kind}", r["key"], r["text"])
        contam, contam_own = DecontaminationReport(), DecontaminationReport()
        kept = list(decontaminate(decontaminate(kept, index, report=contam), own, report=contam_own))
        data_dir = self.path("data")
        data_dir.mkdir(parents=True, exist_ok=True)
        write_records(data_dir / "train.jsonl", ({"text": r["text"], "kind": r.get("kind", "teacher")} for r in kept))
        write_records(data_dir / "heldout.jsonl", (r for rs in heldout.values() for r in rs))
        write_records(data_dir / "sft.jsonl", self._sft_conversations(kept, self.seed))
        return {"documents": len(docs), "teacher_documents": len(teacher_docs), "kept": len(kept),
                "dedup": {"exact": dedup_report.exact_duplicates, "near": dedup_report.near_duplicates},
                "decontaminate": {"benchmarks (HumanEval, GSM8K; 13-gram)": contam.contaminated,
                                  "held-out exercises (13-gram)": contam_own.contaminated},
                "heldout": {k: len(v) for k, v in heldout.items()}}

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

    @staticmethod
    def _sft_conversations(records: list[dict], seed: int = 0) -> list[dict]:
        """Instruction data from the corpus: exercises as user/assistant turns in OpenAI message shape.

        Exact dedup keeps each one-step arithmetic exercise once (they repeat in a small space), which leaves
        one in thirty solutions one step long, and an assistant tuned on that mix adds a second step to every
        one-step question. The one-step solutions are repeated until they are a third of the arithmetic, as in
        the generator's mix."""
        convs, one_step, arithmetic = [], [], 0
        for r in records:
            if r.get("kind") in ("arithmetic_easy", "arithmetic", "word_problem") and r.get("prompt") and r["text"].startswith(r["prompt"]):
                answer = r["text"][len(r["prompt"]):].strip()
                conv = {"messages": [{"role": "user", "content": r["question"]},
                                     {"role": "assistant", "content": answer}]}
                convs.append(conv)
                if r["kind"] != "word_problem":
                    arithmetic += 1
                    if answer.count("Step ") == 1:
                        one_step.append(conv)
            elif r.get("kind") == "python" and r.get("entry_point"):
                prompt, body = _split_python(r["text"])
                convs.append({"messages": [{"role": "user", "content": "Complete this function:\n" + prompt},
                                           {"role": "assistant", "content": body}]})
        if one_step:
            repeats = max(0, round((arithmetic - len(one_step)) / (2 * len(one_step))) - 1)
            convs += one_step * repeats
            random.Random(seed).shuffle(convs)
        return convs

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
        from .train.config import TrainConfig
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
            max_steps = planned_steps(run_dir, measure)
        cfg.max_steps = max_steps
        cfg.warmup_steps = min(50, max_steps // 10)
        cfg.checkpoint_every = max(5, max_steps // 5)  # a killed run loses at most a fifth of its steps
        cfg.validate()
        resume = (run_dir / "checkpoints").is_dir()
        gpus = torch.cuda.device_count()
        if gpus > 1 and self.preset_name != "cpu-tiny":
            summary = self._pretrain_torchrun(cfg, gpus, resume)
        else:
            summary = run_pretraining(cfg, resume=resume, export=True)
        if summary["status"] != "completed":
            raise RuntimeError(f"pretraining {summary['status']}: rerun the speedrun to resume it")
        if export_dir.exists():
            shutil.rmtree(export_dir)
        os.replace(summary["model_dir"], export_dir)
        tok = self.path("tokenizer")
        from .tokenizer import Tokenizer
        Tokenizer.from_file(tok).save(export_dir)  # tokenizer_config.json too, not only tokenizer.json
        return {"steps": summary["step"], "tokens": summary["tokens"], "tokens_per_second": summary["tokens_per_s"],
                "final_loss": summary.get("loss"), "val_loss": summary.get("val_loss"),
                "unigram_loss": summary.get("unigram_loss"), "mfu": summary.get("mfu"),
                "parameters": summary.get("parameters")}

    def _pretrain_torchrun(self, cfg, gpus: int, resume: bool) -> dict:
        """Several GPUs: write the config and launch.sh beside it, and run it through torchrun (DDP/FSDP2)."""
        import subprocess
        import sys

        import yaml
        cfg.strategy = "fsdp" if self.preset_name == "phi-1_5" else "ddp"
        run_dir = Path(cfg.out_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = run_dir / "pretrain.yaml"
        config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "phikit", "train", "--config", str(config_file)] + (["--resume"] if resume else [])
        (run_dir / "launch.sh").write_text("#!/usr/bin/env bash\n# multi-node: replace --standalone with "
                                           "--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:29500\n"
                                           + " ".join(cmd[2:]).replace("torch.distributed.run", "torchrun") + "\n")
        self.log(f"  launching {' '.join(cmd)}")
        subprocess.run(cmd, check=True)
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["model_dir"] = str(run_dir / "model")
        return summary

    def stage_sft(self, results: dict) -> dict:
        """ChatML instruction tuning of the pretrained model on conversations made from the corpus."""
        from .train.config import TrainConfig
        from .train.sft import SFTConfig, run_sft
        run_dir = self.path("sft-run")
        probe = TrainConfig(model="tiny", model_config=self._model_overrides(), data="-", seq_len=self.preset.seq_len,
                            global_batch_size=self.preset.batch, micro_batch_size=self.preset.batch)
        seconds = self.budget(self.preset.sft_share)
        steps = planned_steps(run_dir, lambda: max(20, int(seconds / probe_step_seconds(probe))))
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
        from .model import build_model
        base, tok = load(self.path("model-base"))
        chat, chat_tok = load(self.path("model-chat"))
        untrained = build_model(base.config, seed=self.seed + 1).eval()
        heldout = self._heldout()
        scores = {
            "untrained": evaluate_model(untrained, tok, heldout, chat_format=False),
            "pretrained": evaluate_model(base, tok, heldout, chat_format=False),
            "sft": evaluate_model(chat, chat_tok, heldout, chat_format=True),
        }
        return {"scores": scores, "samples": sample_formats(chat, chat_tok, base, tok)}

    def stage_ablation(self, results: dict) -> dict:
        """The paper's claim at toy scale: textbook data beats an unfiltered web-like mix at equal compute."""
        from . import load
        from .data.io import read_records, write_records
        from .data.pack import pack
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
                          **evaluate_model(model, tok, self._heldout(), chat_format=False)}
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


def planned_steps(run_dir: Path, measure: Callable[[], int]) -> int:
    """A training run's step count, measured once and kept in run_dir: a resumed run must keep its schedule
    (cosine length, checkpoint spacing), which a second throughput probe would change."""
    plan = Path(run_dir) / "planned_steps.json"
    if plan.exists():
        return int(json.loads(plan.read_text())["max_steps"])
    steps = measure()
    plan.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan, json.dumps({"max_steps": steps}) + "\n")
    return steps


def probe_step_seconds(cfg, steps: int = 5) -> float:
    """Seconds per optimizer step of this config on this machine (forward, backward, update on random tokens).
    The fastest of `steps` timed steps: a burst of other work on the machine during the probe only slows some of
    them, and an inflated figure would leave the run with too few steps for its budget (the schedule is fixed)."""
    from .model import build_model
    from .train.loop import build_optimizers
    model = build_model(cfg.model_preset(), seed=0).train()
    optimizers = build_optimizers(model, cfg, sharded=False)
    ids = torch.randint(0, model.config.tokenizer_vocab_size or model.config.vocab_size,
                        (cfg.micro_batch_size, cfg.seq_len + 1))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    accum = cfg.global_batch_size // cfg.micro_batch_size
    return min(times[1:]) * accum * 1.1  # the first step is warm-up; 10% for evaluations


# ---------------------------------------------------------------------- evaluation helpers
def _split_python(text: str) -> tuple[str, str]:
    """A generated Python exercise -> (signature + docstring prompt, body + tests)."""
    head, sep, rest = text.partition('"""\n')  # first line of the docstring ends at the example block
    close = rest.find('"""\n')
    prompt = head + sep + rest[:close + 4]
    return prompt, rest[close + 4:]


def _quiet_datatrove() -> None:
    """The speedrun prints its own progress; datatrove's per-task banners would drown it."""
    try:
        from loguru import logger
        logger.disable("datatrove")
    except ImportError:
        pass


def _gsm8k_file() -> Path | None:
    """GSM8K test questions for decontamination: a copy beside the checkout, or the items shipped with phikit."""
    for p in (Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "test.jsonl",
              Path(__file__).resolve().parent / "eval" / "assets" / "gsm8k_test_head.jsonl"):
        if p.exists():
            return p
    return None


def final_answer(completion: str) -> int | None:
    """The number a completion gives as its answer: after its last 'Answer:', or the whole completion when that is
    a bare number. A solution cut off before its answer gives None, never a number picked from its steps."""
    from .data.procedural import parse_answer
    if "Answer:" in completion:
        return parse_answer(completion)
    bare = completion.strip().rstrip(".")
    return int(bare) if re.fullmatch(r"-?\d+", bare) else None


def solution_tokens(tokenizer, records: list[dict]) -> int:
    """A generation budget that fits the longest reference solution of these exercises, with room to spare."""
    return max(len(tokenizer.encode(r["text"][len(r["prompt"]):])) for r in records) + 32


@torch.no_grad()
def evaluate_model(model, tokenizer, heldout: dict[str, list[dict]], chat_format: bool,
                   perplexity: bool = True) -> dict:
    """Held-out arithmetic/word-problem accuracy, code pass@1 (sandboxed), perplexity, multiple choice."""
    from .inference.decoding import generate
    from .sandbox import run_many

    result: dict[str, Any] = {}
    for kind in ("arithmetic_easy", "arithmetic", "word_problem"):
        records = heldout.get(kind, [])
        if not records:
            continue
        # Word problems take up to ~200 tokens of steps: a fixed short budget would cut most of them off before
        # their answer and score them wrong whatever the model knows.
        budget = solution_tokens(tokenizer, records)
        if chat_format:
            outs = chat_batch(model, tokenizer, [r["question"] for r in records], budget)
        else:
            outs = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=budget,
                            stop=["\n\n", "Question:"])
        correct = [final_answer(o) == r["answer"] for o, r in zip(outs, records)]
        result[f"{kind}_accuracy"] = sum(correct) / len(correct)
        result[f"{kind}_counts"] = [sum(correct), len(correct)]  # for the report's exact test against the baseline
        if kind.startswith("arithmetic"):  # also by difficulty: one operation, or several
            ops = [sum(r["question"].count(f" {c} ") for c in "+-*") for r in records]
            for label, keep in (("1op", lambda n: n == 1), ("multi_op", lambda n: n > 1)):
                picked = [c for c, n in zip(correct, ops) if keep(n)]
                if picked:
                    result[f"{kind}_{label}_accuracy"] = sum(picked) / len(picked)
    code = heldout.get("python", [])[:30]
    if code:
        prompts, tests = zip(*(_split_python(r["text"]) for r in code))
        if chat_format:
            outs = chat_batch(model, tokenizer, ["Complete this function:\n" + p for p in prompts], 128)
        else:
            outs = generate(model, tokenizer, list(prompts), max_new_tokens=128, stop=["\ndef ", "\nassert", "\n\n\n"])
        programs = []
        for p, o, t in zip(prompts, outs, tests):
            body = o.split("\nassert")[0]
            asserts = "\n".join(line for line in t.splitlines() if line.startswith("assert"))
            programs.append(p + body + "\n\n" + asserts + "\n")
        verdicts = run_many(programs, timeout=5.0)
        result["code_pass@1"] = sum(v.passed for v in verdicts) / len(verdicts)
    mc = (heldout.get("arithmetic_easy") or heldout.get("arithmetic", []))[:60]
    if mc:
        result["mc_accuracy"] = arithmetic_multiple_choice(model, tokenizer, mc)
    if perplexity:
        texts = [r["text"] for rs in heldout.values() for r in rs[:30]]
        result["heldout_perplexity"] = text_perplexity(model, tokenizer, texts)
    return result


def chat_batch(model, tokenizer, user_texts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Single-turn chats decoded together (one batched generate call per batch_size prompts)."""
    from .inference.decoding import chat_prompt, generate
    outs: list[str] = []
    for i in range(0, len(user_texts), batch_size):
        rendered = [chat_prompt(tokenizer, [{"role": "user", "content": t}]) for t in user_texts[i:i + batch_size]]
        fmt, stops = rendered[0][1], rendered[0][2]
        texts = generate(model, tokenizer, [r[0] for r in rendered], max_new_tokens=max_new_tokens, **stops)
        outs += [fmt.cut(t) for t in texts]
    return outs


@torch.no_grad()
def sequence_logprob(model, tokenizer, context: str, continuation: str) -> float:
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    ids = torch.tensor([ctx + cont])
    logp = model(ids).logits[0, :-1].float().log_softmax(-1)
    tgt = ids[0, 1:]
    return float(logp[len(ctx) - 1:].gather(-1, tgt[len(ctx) - 1:, None]).sum())


def arithmetic_multiple_choice(model, tokenizer, records: list[dict]) -> float:
    """4-way choice among the true answer and near misses, scored by log-likelihood (lm-eval style)."""
    rng = random.Random(0)
    correct = 0
    for r in records:
        a = r["answer"]
        options = [a] + rng.sample([a + d for d in (-10, -2, -1, 1, 2, 10)], 3)
        scores = [sequence_logprob(model, tokenizer, f"Question: {r['question']}\nAnswer:", f" {o}") for o in options]
        correct += int(max(range(4), key=scores.__getitem__) == 0)
    return correct / len(records)


@torch.no_grad()
def text_perplexity(model, tokenizer, texts: list[str]) -> float:
    nll, count = 0.0, 0
    ctx = model.config.max_position_embeddings
    for t in texts:
        ids = [tokenizer.eos_token_id] + tokenizer.encode(t)[: ctx - 1]
        x = torch.tensor([ids])
        logp = model(x).logits[0, :-1].float().log_softmax(-1)
        nll -= float(logp.gather(-1, x[0, 1:, None]).sum())
        count += len(ids) - 1
    return math.exp(nll / max(count, 1))


def sample_formats(chat_model, chat_tok, base_model, base_tok) -> dict[str, dict[str, str]]:
    """One sample per prompt format of the model cards, greedy, cut where each format says the answer ends."""
    from .inference.formats import get_format
    from .inference.decoding import generate
    user = "What is 7 + 5?"
    out = {}
    for name, model, tok in (("code", base_model, base_tok), ("qa", base_model, base_tok),
                             ("instruct", base_model, base_tok), ("chat", base_model, base_tok),
                             ("chatml", chat_model, chat_tok)):
        fmt = get_format(name)
        content = 'def add(a, b):\n    """Return the sum of a and b."""\n' if name == "code" else user
        prompt = fmt.render([{"role": "user", "content": content}])
        text = generate(model, tok, prompt, max_new_tokens=48, stop=fmt.stop_strings or None)
        out[name] = {"prompt": prompt, "completion": fmt.cut(text)}
    return out


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
