"""The server on a real loopback port, driven by the official `openai` client, raw HTTP for malformed input,
schemathesis for fuzzing, prometheus_client's parser for /metrics, and headless Chromium for the chat page."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from phikit import build_model, get_config
from phikit.inference.formats import get_format
from phikit.serve import create_app
from phikit.serve.server import DrainingServer
from phikit.tokenizer import CHATML_TEMPLATE, build_phi_tokenizer, train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "sk-test"
MODEL = "tiny-phi"


def tiny_model(context: int = 128):
    # A large init spread makes greedy choices decisive (no near-ties), so outputs are reproducible.
    config = get_config("tiny", vocab_size=50304, tokenizer_vocab_size=50295, max_position_embeddings=context,
                        initializer_range=0.3)
    return build_model(config, seed=0).eval()


class SlowModel(torch.nn.Module):
    """The tiny model with a fixed delay per forward pass, so a test can act while a request is decoding."""

    def __init__(self, model, delay: float) -> None:
        super().__init__()
        self.inner, self.delay, self.config = model, delay, model.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


@contextmanager
def serving(app, server_class=uvicorn.Server, **server_kwargs):
    """Run the app under uvicorn on a free loopback port in a background thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = server_class(config, **server_kwargs)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.fixture(scope="module")
def server(phi_tokenizer):
    app = create_app(tiny_model(), phi_tokenizer, model_name=MODEL, api_key=KEY, max_batch=8, max_queue=8)
    with serving(app) as (url, _server, _thread):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=server[0] + "/v1", max_retries=0, timeout=60)


def greedy(client, prompt: str, max_tokens: int = 24, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


# --- the OpenAI API through the official client ---

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_completion_streamed_equals_non_streamed(client, phi_tokenizer):
    prompt = "def fibonacci(n):"
    full = greedy(client, prompt)
    choice = full.choices[0]
    assert full.usage.prompt_tokens == len(phi_tokenizer.encode(prompt))
    assert full.usage.completion_tokens == 24 and full.usage.total_tokens == full.usage.prompt_tokens + 24
    assert choice.finish_reason == "length" and choice.text
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1, "answer should arrive in pieces"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_stop_sequences_end_the_answer_without_leaking(client):
    prompt = "Once upon a time"
    text = greedy(client, prompt, max_tokens=30).choices[0].text
    stop = text[12:16]
    expected = text[:text.find(stop)]
    cut = greedy(client, prompt, max_tokens=30, stop=[stop, "unlikely-stop-string"]).choices[0]
    assert cut.text == expected and cut.finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_n_choices_and_seed(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="The weather", max_tokens=10, n=3, temperature=1.0,
                                         seed=seed)

    first, again = sample(7), sample(7)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1, "the n continuations should differ"
    if all(c.finish_reason == "length" for c in first.choices):
        assert first.usage.completion_tokens == 30
    # Several prompts x n: index = prompt * n + choice.
    multi = client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text != multi.choices[2].text == multi.choices[3].text
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, n=2, stream=True)
    assert {c.choices[0].index for c in streamed if c.choices} == {0, 1}


def test_chat_streamed_equals_non_streamed(client, phi_tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    answer = full.choices[0].message
    assert answer.role == "assistant"
    # The base tokenizer has no ChatML: the chat transcript format, rendered once by the server.
    prompt = get_format("chat").render(messages)
    assert full.usage.prompt_tokens == len(phi_tokenizer.encode(prompt))
    assert answer.content == answer.content.strip()
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_predicted_outputs_give_the_same_answer_and_count_kept_tokens(client):
    """OpenAI's `prediction` parameter: the answer does not change, right or wrong; usage says how many predicted
    tokens the model agreed with, as OpenAI reports them."""
    messages = [{"role": "user", "content": "Rewrite this code: def f(x): return x + 1"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    answer = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None  # no prediction, no prediction counts
    right = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                           prediction={"type": "content", "content": answer})
    assert right.choices[0].message.content == answer
    details = right.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= right.usage.completion_tokens // 2, details
    wrong = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                           prediction={"type": "content",
                                                       "content": [{"type": "text", "text": "nothing alike"}]})
    assert wrong.choices[0].message.content == answer
    assert wrong.usage.completion_tokens_details.accepted_prediction_tokens == 0
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                                 prediction={"type": "content", "content": answer}, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens == details.accepted_prediction_tokens
    text = greedy(client, "def add(a, b):", max_tokens=30).choices[0].text
    predicted = greedy(client, "def add(a, b):", max_tokens=30, extra_body={"prediction": {"type": "content",
                                                                                            "content": text}})
    assert predicted.choices[0].text == text and predicted.usage.completion_tokens_details.accepted_prediction_tokens


def test_the_earliest_of_overlapping_stop_strings_ends_the_answer(client, phi_tokenizer):
    # One token, " understanding": "erst" starts in it before "stand", though "stand" is listed first.
    [token] = phi_tokenizer.encode(" understanding")
    kw = {"max_tokens": 3, "logit_bias": {str(token): 100}, "stop": ["stand", "erst"]}
    out = greedy(client, "x", **kw).choices[0]
    assert out.text == " und" and out.finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="x", temperature=0, stream=True, **kw)
    assert "".join(c.choices[0].text for c in streamed) == " und"


def test_stop_token_and_logit_bias(client, phi_tokenizer):
    eos = phi_tokenizer.eos_token_id
    out = greedy(client, "Hello", max_tokens=10, logit_bias={str(eos): 100})
    assert out.choices[0].text == "" and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 1


def test_logprobs(client, phi_tokenizer):
    out = greedy(client, "import numpy", max_tokens=6, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the most likely token
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content)
    assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in content if "\ufffd" not in t.token)


def test_completion_top_logprobs_include_the_sampled_token(client):
    """OpenAI's legacy logprobs always list the sampled token among the alternatives (up to logprobs + 1)."""
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=2.0, seed=3, logprobs=0)
    lp = out.choices[0].logprobs
    assert lp.top_logprobs == [{tok: logprob} for tok, logprob in zip(lp.tokens, lp.token_logprobs)]
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=2.0, seed=3, logprobs=1)
    lp = out.choices[0].logprobs
    assert all(top[tok] == logprob and len(top) <= 2 for tok, logprob, top in
               zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))


def test_wrong_or_missing_key_gets_401(server):
    bad = openai.OpenAI(api_key="sk-wrong", base_url=server[0] + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert "API key" in err.value.body["message"]
    assert httpx.get(server[0] + "/v1/models").status_code == 401
    assert httpx.get(server[0] + "/health").status_code == 200  # probes need no key


def test_chatml_model_renders_messages_once():
    tokenizer = build_phi_tokenizer()
    im_start, im_end = tokenizer.add_chatml()
    model = tiny_model()
    with torch.no_grad():  # a fresh model: make its two new token rows ordinary
        model.model.embed_tokens.weight[im_start] = model.model.embed_tokens.weight[0]
    app = create_app(model, tokenizer, model_name=MODEL)
    assert app.state.format.name == "chatml"
    reference = transformers_chat_tokens(tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    with serving(app) as (url, _server, _thread):
        client = openai.OpenAI(api_key="unused", base_url=url + "/v1", max_retries=0)
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
        assert out.usage.prompt_tokens == len(reference(messages))
        ended = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                               logit_bias={str(im_end): 100})
    assert ended.choices[0].message.content == "" and ended.choices[0].finish_reason == "stop"


def transformers_chat_tokens(tokenizer):
    """transformers' apply_chat_template with the ChatML template: the independent reference for rendering."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, chat_template=CHATML_TEMPLATE)

    def encode(messages):
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return hf(text, add_special_tokens=False)["input_ids"]

    return encode


# --- malformed input: always a 4xx in OpenAI's error shape, never a 500 ---

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
MALFORMED = [
    ("invalid JSON", COMPLETIONS, b'{"model": "tiny-phi", "prompt": ', 400, "not valid JSON"),
    ("not an object", COMPLETIONS, [1, 2], 400, "JSON object"),
    ("empty body", CHAT, b"", 400, "missing"),
    ("missing prompt", COMPLETIONS, {"model": MODEL}, 400, "prompt is required"),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages is required"),
    ("missing model", CHAT, {"messages": USER}, 400, "model is required"),
    ("max_tokens as a string", COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("temperature as a string", CHAT, {"model": MODEL, "messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("stream as a number", CHAT, {"model": MODEL, "messages": USER, "stream": 1}, 400, "stream"),
    ("messages as a string", CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("content as a number", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("huge max_tokens", COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": 10**9}, 400, "context of 128"),
    ("huge max_completion_tokens", CHAT, {"model": MODEL, "messages": USER, "max_completion_tokens": 10**9}, 400,
     "max_completion_tokens to at most"),
    ("negative max_tokens", COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("empty messages", CHAT, {"model": MODEL, "messages": []}, 400, "at least 1"),
    ("unknown model", CHAT, {"model": "gpt-5", "messages": USER}, 404, "does not exist"),
    ("unknown role", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("tool role", CHAT, {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("n too large", CHAT, {"model": MODEL, "messages": USER, "n": 1000}, 400, "n"),
    ("empty stop string", COMPLETIONS, {"model": MODEL, "prompt": "a", "stop": [""]}, 400, "stop"),
    ("token id out of vocabulary", COMPLETIONS, {"model": MODEL, "prompt": [99999999]}, 400, "vocabulary"),
    ("bad logit_bias key", COMPLETIONS, {"model": MODEL, "prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("superscript logit_bias key", COMPLETIONS, {"model": MODEL, "prompt": "a", "logit_bias": {"\u00b2": 1}}, 400,
     "logit_bias"),
    ("top_logprobs without logprobs", CHAT, {"model": MODEL, "messages": USER, "top_logprobs": 2}, 400, "logprobs"),
    ("image content", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "content"),
    ("prediction of another type", CHAT,
     {"model": MODEL, "messages": USER, "prediction": {"type": "file", "content": "x"}}, 400, "prediction"),
    ("lone surrogate in content", CHAT,
     b'{"model": "tiny-phi", "messages": [{"role": "user", "content": "a\\ud800"}]}', 400, "surrogate"),
    ("lone surrogate in prompt", COMPLETIONS, b'{"model": "tiny-phi", "prompt": ["a", "\\udc00"]}', 400, "surrogate"),
    ("lone surrogate in prediction", CHAT, b'{"model": "tiny-phi", "messages": [{"role": "user", "content": "a"}], '
     b'"temperature": 0, "prediction": {"type": "content", "content": "x\\ud800"}}', 400, "surrogate"),
    ("body not UTF-8", CHAT, b'{"model": "tiny-phi", "messages": [{"role": "user", "content": "\xff"}]}', 400,
     "UTF-8"),
    ("JSON mode", CHAT, {"model": MODEL, "messages": USER, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("forced tool call", CHAT, {"model": MODEL, "messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    ("null content", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": None}]}, 400,
     "messages.0.content is required"),
    ("10 MB body", COMPLETIONS, b'{"model": "tiny-phi", "prompt": "' + b"a" * (10 * 2**20) + b'"}', 413, "larger"),
]


@pytest.mark.parametrize("path,body,status,words", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_clear_4xx(server, path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server[0] + path, content=content, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and "\n" not in error["message"]


def test_null_fields_take_their_defaults(client):
    """OpenAI's optional fields are nullable, and the openai client sends null for a Python None."""
    messages = [{"role": "user", "content": "Pick a number."}]
    default = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=5)
    nulls = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=5, temperature=None,
                                           top_p=None, n=None, stop=None, logprobs=None, top_logprobs=None,
                                           presence_penalty=None, frequency_penalty=None, stream_options=None,
                                           max_completion_tokens=None, response_format={"type": "text"},
                                           tool_choice="auto", extra_body={"top_k": None, "stream": None})
    assert [c.message.content for c in nulls.choices] == [c.message.content for c in default.choices]
    streamed = client.completions.create(model=MODEL, prompt="x", max_tokens=2, stream=True, echo=None,
                                         stream_options={"include_usage": None})
    assert "".join(c.choices[0].text for c in streamed if c.choices)


def test_json_body_without_json_content_type_is_read(server, client):
    # `curl -d '{...}'` sends Content-Type: application/x-www-form-urlencoded
    body = {"model": MODEL, "prompt": "curl", "max_tokens": 4, "temperature": 0}
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        r = httpx.post(server[0] + COMPLETIONS, content=json.dumps(body).encode(), timeout=60,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": content_type})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy(client, "curl", max_tokens=4).choices[0].text


def test_extreme_but_valid_sampling_parameters_work(client):
    # Values at the edges of the schema once overflowed to NaN probabilities (found by schemathesis).
    for params in [dict(temperature=1e-300), dict(temperature=2.0, top_p=1e-300, min_p=0.9999),
                   dict(temperature=1.0, repetition_penalty=0.01, presence_penalty=2.0, frequency_penalty=-2.0)]:
        out = client.completions.create(model=MODEL, prompt="edge", max_tokens=4, extra_body=params)
        assert out.choices[0].finish_reason == "length", params


def test_wrong_method_and_route_are_openai_errors(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(server[0] + COMPLETIONS, headers=headers)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(server[0] + "/v1/nothing", headers=headers)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server[0] + "/health").status_code == 200  # still alive after all of the above


def test_schemathesis_finds_no_server_errors():
    here = str(Path(sys.executable).parent)  # the venv's scripts, also when the venv is not activated
    st = shutil.which("st", path=here) or shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis is not installed")
    # A small vocabulary and a short context keep the many generated (valid) requests quick.
    tokenizer = train_bpe(["the quick brown fox jumps over the lazy dog " * 20, "def f(x):\n    return x\n"], 320)
    config = get_config("tiny", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        max_position_embeddings=32, tokenizer_vocab_size=len(tokenizer))
    app = create_app(build_model(config), tokenizer, model_name=MODEL, max_batch=16, max_queue=64)
    with serving(app) as (url, _server, _thread):
        run = subprocess.run([st, "run", url + "/openapi.json", "--checks", "not_a_server_error",
                              "--phases", "coverage,fuzzing", "--include-method", "POST", "--max-examples", "5",
                              "--seed", "1", "--request-timeout", "30", "--no-color"],
                             capture_output=True, text=True, timeout=300)
        assert httpx.get(url + "/health").status_code == 200
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1]


# --- /metrics, read with prometheus_client's own parser ---

def test_metrics_are_prometheus_text(server, client):
    greedy(client, "count me", max_tokens=3)
    text = httpx.get(server[0] + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value
                for s in families["phikit_requests"].samples if s.name == "phikit_requests_total"}
    assert requests[(COMPLETIONS, "200")] >= 1
    assert any(status == "400" for _endpoint, status in requests)
    generated = [s.value for s in families["phikit_generation_tokens"].samples if s.name.endswith("_total")]
    assert generated[0] >= 3
    assert families["phikit_queue_depth"].samples[0].value == 0
    assert any(s.name == "phikit_time_to_first_token_seconds_count" and s.value >= 1
               for s in families["phikit_time_to_first_token_seconds"].samples)
    assert any(s.name == "phikit_request_latency_seconds_bucket" for s in
               families["phikit_request_latency_seconds"].samples)


# --- batching, cancellation, limits, shutdown: on a model slowed to ~20 ms per step ---

@pytest.fixture(scope="module")
def slow_server(phi_tokenizer):
    app = create_app(SlowModel(tiny_model(), 0.02), phi_tokenizer, model_name=MODEL, max_batch=2, max_queue=1)
    with serving(app) as (url, _server, _thread):
        yield url, app, openai.OpenAI(api_key="unused", base_url=url + "/v1", max_retries=0, timeout=30)


def test_request_joins_running_batch_and_leaves_first(slow_server):
    _url, app, client = slow_server
    engine = app.state.engine
    engine.max_rows_seen = 0
    long = client.completions.create(model=MODEL, prompt="a long answer", max_tokens=40, temperature=0, stream=True)
    chunks = iter(long)
    next(chunks)  # decoding is under way
    short = client.completions.create(model=MODEL, prompt="short", max_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length"
    assert engine.num_running == 1, "the finished request left the batch, the long one is still decoding"
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert engine.max_rows_seen == 2


def test_dropped_client_cancels_its_generation(slow_server):
    _url, app, client = slow_server
    engine = app.state.engine
    steps = engine.steps
    with client.completions.with_streaming_response.create(model=MODEL, prompt="talk", max_tokens=60,
                                                           temperature=0, stream=True) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 5
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0
    assert engine.steps - steps < 50, "decoding should stop when the client goes away"


def test_stream_chunks_share_one_id_and_created_time(slow_server):
    """OpenAI: every chunk of a stream has the completion's id and timestamp, even when it spans seconds."""
    _url, _app, client = slow_server
    start = time.monotonic()
    chunks = list(client.completions.create(model=MODEL, prompt="tick", max_tokens=60, temperature=0, stream=True))
    assert time.monotonic() - start > 1  # 60 steps of >= 20 ms: the chunks were made in different seconds
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "tock"}],
                                               max_tokens=60, temperature=0, stream=True))
    assert len({c.id for c in chat}) == 1 and len({c.created for c in chat}) == 1


def test_full_queue_gets_429(slow_server):
    url, app, client = slow_server
    body = {"model": MODEL, "prompt": "busy", "max_tokens": 60, "stream": True}
    with httpx.Client(base_url=url, timeout=30) as http, ExitStack() as held:
        for _ in range(3):  # two decode, one waits
            held.enter_context(http.stream("POST", COMPLETIONS, json=body))
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=MODEL, prompt="one too many", max_tokens=1)
        assert "--max-queue" in err.value.body["message"]
    deadline = time.monotonic() + 5
    while app.state.engine.num_running + app.state.engine.num_waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.state.engine.num_running + app.state.engine.num_waiting == 0, "closed streams free their slots"


def test_slow_requests_time_out_with_504(phi_tokenizer):
    app = create_app(SlowModel(tiny_model(), 0.02), phi_tokenizer, model_name=MODEL, request_timeout=0.3)
    with serving(app) as (url, _server, _thread):
        client = openai.OpenAI(api_key="unused", base_url=url + "/v1", max_retries=0, timeout=30)
        # 60 steps at >= 20 ms each take longer than the 0.3 s request timeout.
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model=MODEL, prompt="slow", max_tokens=60)
        assert err.value.status_code == 504 and "request-timeout" in err.value.body["message"]
        with pytest.raises(openai.APIError, match="request-timeout"):
            list(client.completions.create(model=MODEL, prompt="slow", max_tokens=60, stream=True))
        assert app.state.engine.num_running == 0


def test_shutdown_finishes_in_flight_requests_and_refuses_new_ones(phi_tokenizer):
    app = create_app(SlowModel(tiny_model(), 0.02), phi_tokenizer, model_name=MODEL)
    with serving(app, DrainingServer, drain_timeout=30) as (url, server, thread):
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", COMPLETIONS, json={"model": MODEL, "prompt": "x", "max_tokens": 25,
                                                        "stream": True}) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                server.handle_exit(signal.SIGTERM, None)  # what uvicorn calls on SIGTERM
                refused = httpx.post(url + COMPLETIONS, json={"model": MODEL, "prompt": "late"}, timeout=10)
                rest = [line for line in lines if line.startswith("data:")]
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_shutting_down"
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        thread.join(timeout=20)
        assert not thread.is_alive(), "the server should exit once the in-flight request is done"


# --- the chat page, in headless Chromium ---

def test_chat_page_streams_an_answer(server, client):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/test-deps.sh installs it)")
    question = "Say something."
    expected = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                              max_tokens=16, temperature=0).choices[0].message.content
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.goto(server[0] + "/")
            assert MODEL in page.text_content("#model")
            page.fill("#api-key", KEY)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "16")
            page.fill("#input", question)
            page.press("#input", "Enter")
            answer = page.locator(".msg.assistant").last
            page.wait_for_function("() => document.querySelector('.msg.assistant')?.dataset.done === 'true'",
                                   timeout=30000)
            assert page.locator(".msg.user").last.text_content() == question
            assert answer.text_content() == expected
            assert int(answer.get_attribute("data-chunks")) > 1, "the answer should have streamed in pieces"
        finally:
            browser.close()


def test_n_above_the_batch_size_names_the_n_field(server):
    r = httpx.post(server[0] + COMPLETIONS, json={"model": MODEL, "prompt": "x", "max_tokens": 2, "n": 9},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "n" and "batch size of 8" in error["message"]
