"""Prompt formats: rendering (ChatML against transformers' chat template) and where each answer stops."""
from __future__ import annotations

import pytest
import torch

from phikit import build_model, get_config
from phikit.inference.formats import FORMAT_NAMES, default_format, get_format
from phikit.inference.decoding import chat
from phikit.model import PhiForCausalLM
from phikit.tokenizer import CHATML_TEMPLATE, build_phi_tokenizer

MESSAGES = [
    {"role": "system", "content": "You are a patient tutor."},
    {"role": "user", "content": "I'm struggling to maintain focus while studying. Any suggestions?"},
    {"role": "assistant", "content": "Have you tried using a timer?"},
    {"role": "user", "content": "Yes, it doesn't help much."},
]
ASK = [{"role": "user", "content": "Write a detailed analogy between mathematics and a lighthouse."}]


class ScriptedModel(PhiForCausalLM):
    """A real (tiny) model whose next-token choice is forced to follow a script, to test stop rules end to end."""

    script: list[int] = []

    def forward(self, input_ids=None, past_key_values=None, **kw):
        before = past_key_values.length if past_key_values is not None else 0
        out = super().forward(input_ids, past_key_values=past_key_values, **kw)
        step = 0 if before == 0 else past_key_values.length - self.prompt_len
        if before == 0:
            self.prompt_len = past_key_values.length
        forced = torch.full_like(out.logits, -1e4)
        forced[..., self.script[min(step, len(self.script) - 1)]] = 0.0
        out.logits = forced
        return out


@pytest.fixture(scope="module")
def scripted(phi_tokenizer):
    config = get_config("tiny", hidden_size=64, intermediate_size=128, vocab_size=51200,
                        tokenizer_vocab_size=len(phi_tokenizer))
    model = ScriptedModel(config)
    model.load_state_dict(build_model(config, seed=0).state_dict())
    return model.eval()


def _say(model, tokenizer, text):
    model.script = tokenizer.encode(text)


def test_model_card_prompts():
    assert get_format("qa").render(ASK) == "Write a detailed analogy between mathematics and a lighthouse.\nAnswer:"
    assert get_format("instruct").render(ASK) == (
        "Instruct: Write a detailed analogy between mathematics and a lighthouse.\nOutput:")
    assert get_format("chat").render(MESSAGES[1:2]) == (
        "Alice: I'm struggling to maintain focus while studying. Any suggestions?\nBob:")
    code = 'def print_prime(n):\n   """\n   Print all primes between 1 and n\n   """'
    assert get_format("code").render([{"role": "user", "content": code}]) == code


def test_multi_turn_rendering():
    assert get_format("chat", user_name="Student", assistant_name="Teacher").render(MESSAGES) == (
        "You are a patient tutor.\n"
        "Student: I'm struggling to maintain focus while studying. Any suggestions?\n"
        "Teacher: Have you tried using a timer?\n"
        "Student: Yes, it doesn't help much.\nTeacher:")
    assert get_format("qa").render(MESSAGES) == (
        "You are a patient tutor.\n\n"
        "I'm struggling to maintain focus while studying. Any suggestions?\nAnswer: Have you tried using a timer?\n\n"
        "Yes, it doesn't help much.\nAnswer:")
    assert get_format("instruct").render(MESSAGES[1:], add_generation_prompt=False).endswith(
        "Instruct: Yes, it doesn't help much.")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_equals_transformers_chat_template(phi_tokenizer, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    tok = build_phi_tokenizer()
    tok.add_chatml()
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=CHATML_TEMPLATE)
    expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert get_format("chatml").render(MESSAGES, add_generation_prompt=add_generation_prompt) == expected
    assert default_format(tok) == "chatml" and default_format(phi_tokenizer) == "chat"


@pytest.mark.parametrize("name,continuation,answer", [
    ("qa", " Mathematics is a lighthouse.\n\nExercise 2: Write an analogy", "Mathematics is a lighthouse."),
    ("qa", " Light.\nQuestion: what is a ship?", "Light."),
    ("instruct", " A guide in the dark.\nInstruct: Now write a poem", "A guide in the dark."),
    ("chat", " Try a timer.\nAlice: I did. \nBob: Then", "Try a timer."),
    ("chatml", "Try a timer.<|im_end|>\n<|im_start|>user\nok", "Try a timer."),
    ("code", "\n    return n < 2\n\ndef main():\n    pass", "\n    return n < 2"),
    ("code", "\n    return 1\n\n\nif __name__ == '__main__':", "\n    return 1"),
])
def test_each_format_stops_where_its_answer_ends(scripted, phi_tokenizer, name, continuation, answer):
    _say(scripted, phi_tokenizer, continuation + " and more text that must never be reached" * 3)
    got = chat(scripted, phi_tokenizer, ASK, format=name, max_new_tokens=80)
    assert got == answer
    assert get_format(name).cut(continuation) == answer


def test_chat_with_any_speaker_names_stops_at_the_next_speaker_line(scripted, phi_tokenizer):
    fmt = get_format("chat", user_name="Student", assistant_name="Teacher")
    _say(scripted, phi_tokenizer, " Break it into chunks.\nStudent: thanks\nTeacher: welcome")
    assert chat(scripted, phi_tokenizer, MESSAGES, format=fmt, max_new_tokens=40) == "Break it into chunks."


def test_chatml_model_stops_on_the_im_end_token(scripted):
    tok = build_phi_tokenizer()
    im_start, im_end = tok.add_chatml()
    scripted.script = tok.encode("Sure thing.") + [im_end] + tok.encode("junk junk junk")
    assert chat(scripted, tok, ASK, max_new_tokens=20) == "Sure thing."  # ChatML chosen from the tokenizer


@pytest.mark.parametrize("name", ["chat", "qa", "instruct", "code"])
def test_chatml_model_stops_on_the_im_end_token_in_any_format(scripted, name):
    # A ChatML-tuned model ends its turn with <|im_end|> whatever format the prompt is written in.
    tok = build_phi_tokenizer()
    im_start, im_end = tok.add_chatml()
    scripted.script = tok.encode(" Sure thing.") + [im_end] + tok.encode(" junk junk junk")
    assert chat(scripted, tok, ASK, format=name, max_new_tokens=20).strip() == "Sure thing."


@pytest.mark.parametrize("bad,message", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 3}], "string"),
])
def test_bad_messages_are_one_line_errors(bad, message):
    for name in FORMAT_NAMES:
        with pytest.raises(ValueError, match=message):
            get_format(name).render(bad)
    with pytest.raises(ValueError, match="unknown prompt format"):
        get_format("alpaca")
    with pytest.raises(ValueError, match="differ"):
        get_format("chat", user_name="Bob", assistant_name="Bob")
