"""The continuous-batching engine against transformers: requests that join and leave a running batch must decode
exactly what transformers' PhiForCausalLM decodes for each prompt alone."""
from __future__ import annotations

import asyncio

import pytest
import torch
import transformers

from phikit import build_model, get_config
from phikit.inference.quant import CpuLinear
from phikit.inference.sampling import SamplingParams
from phikit.serve.engine import PREDICTION_DRAFT_TOKENS, Engine, Group

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50295


@pytest.fixture(scope="module")
def models():
    # A large init spread makes greedy choices decisive, so batching cannot flip a near-tie.
    config = get_config("tiny", vocab_size=50304, tokenizer_vocab_size=VOCAB, max_position_embeddings=128,
                        initializer_range=0.3)
    ours = build_model(config, seed=0).eval()
    ref = transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf_dict())).eval()
    ref.load_state_dict(ours.state_dict(), strict=False)
    return ours, ref


def reference_greedy(ref, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding with transformers, a full forward per token, padding rows excluded."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = ref(torch.tensor([ids])).logits[0, -1, :VOCAB]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def greedy_group(prompt: list[int], max_new: int, n: int = 1) -> Group:
    return Group(list(prompt), SamplingParams(max_new_tokens=max_new, temperature=0.0), n=n)


async def drain(group: Group) -> dict[int, list[int]]:
    """Token ids per choice (logprobs carry them), until every choice finished."""
    out, done = {}, 0
    while done < group.n:
        ev = await group.events.get()
        out.setdefault(ev.index, []).extend(t.token_id for t in ev.tokens)
        done += ev.finish_reason is not None
        if ev.finish_reason:
            group.predicted = (ev.accepted_prediction_tokens, ev.rejected_prediction_tokens)
    return out


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_joining_and_leaving_requests_decode_like_transformers(models, phi_tokenizer, compile):
    """compiled: the steps run PhiForCausalLM.forward_static through torch.compile over a cache that grows and
    shrinks, with batch sizes from 1 to 5 (symbolic sizes)."""
    ours, ref = models
    prompts = {
        "first": phi_tokenizer.encode("def add(a, b):"),
        "longer": phi_tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs far away."),
        "shorter": phi_tokenizer.encode("Hi"),
        "pair": phi_tokenizer.encode("Alice: hello\nBob:"),
    }
    lengths = {"first": 40, "longer": 12, "shorter": 25, "pair": 8}
    engine = Engine(ours, phi_tokenizer, max_batch=8, max_queue=8, compile=compile)
    assert isinstance(ours.lm_head, CpuLinear)  # the engine decodes on the CPU's kernels, as generate does

    async def scenario():
        groups = {name: greedy_group(prompts[name], lengths[name], n=2 if name == "pair" else 1)
                  for name in prompts}
        for g in groups.values():
            g.logprobs = 0  # events then carry the token ids
        doomed = greedy_group(prompts["first"], 100)
        engine.submit([groups["first"], doomed])
        first = asyncio.create_task(drain(groups["first"]))
        # Wait until decoding is under way, then join with a prompt longer than the cache and one shorter.
        while engine.steps < 3:
            await asyncio.sleep(0.001)
        engine.submit([groups["longer"]])
        while engine.steps < 6:
            await asyncio.sleep(0.001)
        engine.submit([groups["shorter"], groups["pair"]])
        doomed.cancel()  # a dropped client: its row must leave the batch
        rest = await asyncio.gather(*(drain(groups[k]) for k in ("longer", "shorter", "pair")))
        return {"first": await first, "longer": rest[0], "shorter": rest[1], "pair": rest[2]}

    engine.start()
    try:
        results = asyncio.run(asyncio.wait_for(scenario(), timeout=400 if compile else 60))
    finally:
        engine.stop()
    assert engine.max_rows_seen >= 3, "requests should have decoded in one batch"
    assert engine.num_running == 0 and engine.num_waiting == 0
    for name, prompt in prompts.items():
        expected = reference_greedy(ref, prompt, lengths[name])
        choices = results[name]
        assert sorted(choices) == list(range(2 if name == "pair" else 1))
        for tokens in choices.values():
            assert tokens == expected, name


def run_groups(engine: Engine, groups: list[Group], timeout: float = 120) -> list[dict[int, list[int]]]:
    async def scenario():
        engine.submit(groups)
        return await asyncio.gather(*(drain(g) for g in groups))
    engine.start()
    try:
        return asyncio.run(asyncio.wait_for(scenario(), timeout=timeout))
    finally:
        engine.stop()


def test_predicted_outputs_decode_like_transformers_in_fewer_steps(models, phi_tokenizer):
    """OpenAI's predicted outputs: a greedy row checks the client's expected tokens several per step. Right,
    edited and wrong predictions, next to a sampled row and a plain greedy row in the same batch, all decode what
    they decode without one (transformers' greedy; the sampled row its own run alone); a right prediction takes
    a fraction of the steps."""
    ours, ref = models
    prompt = phi_tokenizer.encode("def add(a, b):")
    other = phi_tokenizer.encode("The quick brown fox")
    expected = reference_greedy(ref, prompt, 48)
    expected_other = reference_greedy(ref, other, 30)
    edited = expected[:10] + [11, 12, 13] + expected[13:30] + expected[34:]  # a replaced run, then a deletion
    wrong = list(range(1000, 1048))  # tokens of text unlike the answer

    def sampled():
        return Group(list(other), SamplingParams(max_new_tokens=30, temperature=0.9, seed=7), logprobs=0)
    alone = run_groups(Engine(ours, phi_tokenizer, max_batch=8), [sampled()])[0][0]

    engine = Engine(ours, phi_tokenizer, max_batch=8)
    right = greedy_group(prompt, 48)
    right.prediction, right.logprobs = phi_tokenizer.decode(expected), 0
    assert run_groups(engine, [right])[0][0] == expected
    assert engine.steps <= 48 // PREDICTION_DRAFT_TOKENS + 3, engine.steps

    groups = [greedy_group(prompt, 48) for _ in range(3)] + [sampled(), greedy_group(other, 30)]
    for g, prediction in zip(groups, (expected, edited, wrong)):
        g.prediction = phi_tokenizer.decode(prediction)
    for g in groups:
        g.logprobs = 0
    engine = Engine(ours, phi_tokenizer, max_batch=8)
    results = run_groups(engine, groups)
    assert engine.max_rows_seen == 5
    assert [r[0] for r in results] == [expected, expected, expected, alone, expected_other]
    # Greedy with penalties that depend on what came before, and a seed (which greedy ignores): the prediction
    # changes nothing there either.
    def penalized(prediction=""):
        return Group(list(prompt), SamplingParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.3, seed=3),
                     logprobs=0, presence_penalty=0.5, frequency_penalty=0.3, prediction=prediction)
    plain_penalized = run_groups(Engine(ours, phi_tokenizer, max_batch=8), [penalized()])[0][0]
    guided = penalized(phi_tokenizer.decode(plain_penalized))
    assert run_groups(Engine(ours, phi_tokenizer, max_batch=8), [guided])[0][0] == plain_penalized
    assert guided.predicted[0] >= 30, guided.predicted
    # kept guesses: nearly all of the right prediction, most of the edited one, none of the wrong one
    right_kept, edited_kept, wrong_kept = (g.predicted[0] for g in groups[:3])
    assert right_kept >= 40 and edited_kept >= 25 and wrong_kept == 0, [g.predicted for g in groups]
    assert groups[3].predicted == groups[4].predicted == (0, 0)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_predicted_outputs_leave_holes_that_compaction_removes(models, phi_tokenizer, compile):
    """A prediction that is wrong every few tokens leaves unused cache columns behind each miss; when they would
    push the cache past the context the engine compacts it, and decoding goes on unchanged to the context's end.
    compiled: steps without guesses run the compiled fixed-shape step over the same cache, next to a plain row."""
    ours, ref = models
    prompt = phi_tokenizer.encode("Hi")
    steps = ours.config.max_position_embeddings - len(prompt)
    expected = reference_greedy(ref, prompt, steps)
    group = greedy_group(prompt, steps)
    group.prediction = phi_tokenizer.decode([t if k % 5 else t + 1 for k, t in enumerate(expected)])  # 1 in 5 wrong
    group.logprobs = 0
    plain_prompt = phi_tokenizer.encode("def f(x):")
    plain = greedy_group(plain_prompt, 60)
    plain.logprobs = 0
    engine = Engine(ours, phi_tokenizer, max_batch=4, compile=compile)
    got, got_plain = (r[0] for r in run_groups(engine, [group, plain], timeout=400 if compile else 120))
    assert got == expected and got_plain == reference_greedy(ref, plain_prompt, 60)
    assert engine.compactions >= 1
