"""lm-evaluation-harness backend `phikit`: every harness task (IFEval, GSM8K 5-shot, TruthfulQA, MMLU, ...) on
phikit models, with phikit's fast log-likelihood engine and generator.

lm-eval 0.4 finds models only in its own registry (it does not read package entry points), so the backend is
registered when this module is imported. From the shell use the wrapper, which takes lm_eval's own arguments:

    python -m phikit.eval.harness --model phikit --model_args pretrained=DIR --tasks ifeval,gsm8k --limit 20
    phikit eval --model DIR --harness-tasks gsm8k,truthfulqa_mc2       (the same, through the phikit CLI)

From Python: `import phikit.eval.harness` then `lm_eval.simple_evaluate(model="phikit", model_args="pretrained=DIR")`.
"""
from __future__ import annotations

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..progress import tqdm
from .scoring import LogLikelihoodScorer, document_logprob, encode_pair


@register_model("phikit")
class PhikitLM(LM):
    """model_args: pretrained=DIR (or a loaded `model=`/`tokenizer=` pair from Python), dtype, device, quantize
    (as phikit.load), batch_tokens (log-likelihood token budget per forward), max_length. lm-eval's own
    --batch_size (always passed by lm-eval, so not in model_args) is the number of prompts per generation batch."""

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, device: str | None = "cpu",
                 dtype: str | None = None, quantize: str | None = None, batch_tokens: int = 8192,
                 max_length: int | None = None, batch_size: int | str = 8, max_batch_size=None, **unknown) -> None:
        super().__init__()
        if unknown:  # a misspelt model_arg (dtpye=bf16) would otherwise run the whole evaluation without it
            raise ValueError(f"unknown phikit model_args {', '.join(sorted(unknown))}: use pretrained, dtype, device, "
                             "quantize, batch_tokens, max_length")
        if model is None:
            if pretrained is None:
                raise ValueError("the phikit backend needs model_args pretrained=DIR (a checkpoint directory)")
            import phikit
            import torch
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # lm_eval's CLI asks for cuda by default; its HF backend falls back the same way
            if dtype == "auto":  # the HF backend's default: the checkpoint's own dtype (fp32 on the CPU)
                dtype = None
            model, tokenizer = phikit.load(pretrained, device=device or "cpu", dtype=dtype, quantize=quantize)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name = str(pretrained or getattr(model, "name_or_path", "phikit"))
        self.scorer = LogLikelihoodScorer(model, batch_tokens=int(batch_tokens),
                                          max_length=int(max_length) if max_length else None)
        self.gen_batch = int(batch_size) if str(batch_size).isdigit() else 8

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # --- chat templates (--apply_chat_template, --system_instruction, --fewshot_as_multiturn), as the HF backend
    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")  # keys lm-eval's request cache, as the HF backend's does

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.name} has no chat template (its tokenizer_config.json has none): drop "
                             "--apply_chat_template, or evaluate an instruction-tuned (ChatML) model")
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # lm-eval continues the last message (a multiple-choice answer prefix) when it asks for no generation prompt.
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, text: str, **_) -> list[int]:
        return self.tokenizer.encode(text)

    def tok_decode(self, ids, **_) -> str:
        return self.tokenizer.decode(ids)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *req.args) for req in requests]
        scores = self.scorer.score(pairs, progress=not disable_tqdm)
        out = [(s.logprob, s.is_greedy) for s in scores]
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = document_logprob(self.scorer, [self.tokenizer.encode(req.args[0]) for req in requests],
                                  self.eot_token_id, progress=not disable_tqdm)
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..inference.decoding import generate
        # Requests with the same generation settings run together, in batches of similar prompt length.
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(n)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", 256)))
            temperature = float(kwargs.pop("temperature", 0.0))
            do_sample = kwargs.pop("do_sample", None)
            if do_sample is None:  # as lm-eval: a temperature alone asks for sampling
                do_sample = temperature > 0
            temperature = temperature if do_sample else 0.0
            # As lm-eval's HF backend: a prompt keeps its last max_length - max_gen_toks tokens (prompt and answer
            # then fit in max_length), and an empty one continues from <|endoftext|>, the prefix loglikelihood
            # gives an empty context (there is nothing to generate from otherwise).
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for the prompt in max_length "
                                 f"{self.max_length}: lower max_gen_toks or raise max_length")
            prompts = {n: (self.tok_encode(requests[n].args[0]) or [self.eot_token_id])[-room:] for n in indices}
            indices.sort(key=lambda n: len(prompts[n]))
            for s in range(0, len(indices), self.gen_batch):
                batch = indices[s:s + self.gen_batch]
                texts = generate(self.model, self.tokenizer, [prompts[n] for n in batch],
                                 max_new_tokens=max_new, temperature=temperature, top_p=float(kwargs.get("top_p", 1.0)),
                                 stop=until, truncate=True)
                for n, text in zip(batch, texts):
                    for stop in until:  # the harness expects the text cut before the first stop string
                        text = text.split(stop)[0] if stop else text  # ('' stops nothing, as in the harness)
                    out[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                bar.update(len(batch))
        bar.close()
        return out


def main(argv: list[str] | None = None) -> int:
    """`lm_eval`'s own command line, with the phikit backend registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval"] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
