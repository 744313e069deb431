"""The lm-eval backend renders chat templates (--apply_chat_template, --system_instruction, --fewshot_as_multiturn)
exactly as the harness's HF backend does for the same instruction-tuned checkpoint, and generates the same."""
from __future__ import annotations

import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

# Instruction-following prompts as IFEval has them (a prompt, checked by a rule on the answer), and solved examples.
PROMPTS = ["Write a haiku about the sea. Use only lowercase letters.",
           "List three colours, separated by commas, and nothing else.",
           "Say hello in French without using any capital letters."]
SHOTS = [{"prompt": "Name a fruit in lowercase.", "response": "apple"},
         {"prompt": "Name a planet in lowercase.", "response": "mars"}]


@pytest.fixture(scope="module")
def chatml_checkpoint(tmp_path_factory):
    """A tiny random instruction-tuned model: the phi tokenizer with ChatML tokens and template. Its padding rows'
    lm_head bias is -1e4, so the HF backend (which may sample rows past the tokenizer) generates what phikit does."""
    import torch

    import phikit
    from phikit import build_model, get_config
    from phikit.tokenizer import build_phi_tokenizer
    tokenizer = build_phi_tokenizer()
    tokenizer.add_chatml()
    model = build_model(get_config("tiny", vocab_size=51200, tokenizer_vocab_size=len(tokenizer)), seed=1)
    with torch.no_grad():
        model.lm_head.bias[len(tokenizer):] = -1e4
    return phikit.save(model, tokenizer, tmp_path_factory.mktemp("chatml") / "tiny-instruct")


def test_chat_template_renders_as_transformers(chatml_checkpoint):
    from phikit.tokenizer import Tokenizer
    ours = Tokenizer.from_file(chatml_checkpoint)
    ref = transformers.AutoTokenizer.from_pretrained(str(chatml_checkpoint))
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
        [{"role": "user", "content": "Complete: the sky is"}, {"role": "assistant", "content": " blue and "}],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            continue_final = not add_generation_prompt and messages[-1]["role"] == "assistant"
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final)
            assert ours.apply_chat_template(messages, add_generation_prompt,
                                            continue_final_message=continue_final) == expected
            assert ours.encode(expected) == ref(expected, add_special_tokens=False)["input_ids"]


def ifeval_style_task(tmp_path):
    """A generate_until task shaped as lm-eval's ifeval.yaml (doc_to_text: prompt, greedy, until []), on local
    records, scored by an instruction rule (all lowercase), with solved examples for few-shot as multi-turn."""
    from lm_eval.api.task import ConfigurableTask
    data = tmp_path / "ifeval_style.jsonl"
    shots = tmp_path / "shots.jsonl"
    data.write_text("".join(json.dumps({"key": i, "prompt": p, "response": ""}) + "\n" for i, p in enumerate(PROMPTS)))
    shots.write_text("".join(json.dumps(s) + "\n" for s in SHOTS))
    task = ConfigurableTask(config={
        "task": "ifeval_style", "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data), "train": str(shots)}},
        "test_split": "test", "fewshot_split": "train", "num_fewshot": 2, "output_type": "generate_until",
        "doc_to_text": "{{prompt}}", "doc_to_target": "{{response}}", "target_delimiter": " ",
        "generation_kwargs": {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": 6},
        "process_results": lambda doc, results: {"lowercase": float(results[0] == results[0].lower())},
        "metric_list": [{"metric": "lowercase", "aggregation": "mean", "higher_is_better": True}],
    })
    task.set_fewshot_seed(seed=1234)  # as simple_evaluate does: both backends see the same examples
    return task


def run(lm, tmp_path, **chat):
    from lm_eval.evaluator import evaluate
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = evaluate(lm, {"ifeval_style": ifeval_style_task(tmp_path)}, log_samples=True, verbosity="ERROR",
                   bootstrap_iters=0, **chat)
    samples = sorted(out["samples"]["ifeval_style"], key=lambda s: s["doc_id"])
    return samples, out["results"]["ifeval_style"]


@pytest.mark.parametrize("chat", [
    {"apply_chat_template": True},
    {"apply_chat_template": True, "system_instruction": "Answer in lowercase.", "fewshot_as_multiturn": True},
])
def test_chat_requests_and_generations_equal_the_hf_backend(chatml_checkpoint, tmp_path, chat):
    import phikit.eval.harness  # noqa: F401  (registers the backend)
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM
    hf = HFLM(pretrained=str(chatml_checkpoint), device="cpu", batch_size=3, dtype="float32")
    ours = get_model("phikit").create_from_arg_string(f"pretrained={chatml_checkpoint}",
                                                      {"batch_size": 3, "device": "cpu"})
    expected, expected_metrics = run(hf, tmp_path, **chat)
    got, metrics = run(ours, tmp_path, **chat)
    contexts = [s["arguments"][0][0] for s in got]
    assert contexts == [s["arguments"][0][0] for s in expected]
    assert all(c.endswith("<|im_start|>assistant\n") for c in contexts)
    if "system_instruction" in chat:  # the system turn, then the solved examples as earlier turns
        assert contexts[0].startswith("<|im_start|>system\nAnswer in lowercase.<|im_end|>\n<|im_start|>user\n")
        for shot in SHOTS:
            assert (f"<|im_start|>user\n{shot['prompt']}<|im_end|>\n<|im_start|>assistant\n{shot['response']}"
                    "<|im_end|>\n") in contexts[0]
    assert [s["resps"] for s in got] == [s["resps"] for s in expected]
    assert metrics["lowercase,none"] == expected_metrics["lowercase,none"]


def test_a_model_without_a_template_says_so(tiny_phi_checkpoint):
    import phikit.eval.harness  # noqa: F401
    from lm_eval.api.registry import get_model
    lm = get_model("phikit").create_from_arg_string(f"pretrained={tiny_phi_checkpoint}", {"device": "cpu"})
    with pytest.raises(ValueError, match="has no chat template"):
        lm.chat_template(True)
