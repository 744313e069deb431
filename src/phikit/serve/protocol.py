"""Request bodies of the OpenAI API subset the server speaks, and its error shape.

Validation is strict (no "5" for 5, no 1 for true), so a client bug surfaces as a 400 naming the field instead of
a silently coerced value. Fields OpenAI defines that the server does not use (user, tools, ...) are accepted and
ignored, as other OpenAI-compatible servers do; the ones that would change the answer are refused.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# The most alternatives returned per token, as in OpenAI's API.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
MAX_N = 16
MAX_STOPS = 8


class APIError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Body(BaseModel):
    """Strict fields; null means "not given". OpenAI's optional fields are nullable, and the openai client sends
    null for a Python None (temperature=None), so null takes the default instead of failing the type check."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def _encodable(text: str) -> str:
    # JSON can escape a lone UTF-16 surrogate ("\ud800"), which no tokenizer can encode: refuse it here, before it
    # reaches the tokenizer (in the engine thread it would fail every request in the batch).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"character {e.start} is a lone UTF-16 surrogate ({text[e.start]!a}): send valid Unicode")
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class StreamOptions(Body):
    include_usage: bool = False


Stop = Annotated[Text, Field(min_length=1)]


class TextPart(Body):
    type: Literal["text"]
    text: Text


class Prediction(Body):
    """OpenAI's predicted outputs: text the answer is expected to repeat (a file being edited, say). Greedy
    requests check it several tokens per step; the answer is the same, sooner when the prediction is right."""

    type: Literal["content"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SamplingFields(Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(description="the served model's id, as listed by GET /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate (prompt + max_tokens <= context)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 (or below 1e-5) means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N, description="continuations per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | list[Stop] | None = Field(None, description="strings that end the answer (not included)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1 - MAX_N)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=300, description="token id (as a string) -> bias added to its logit")
    # Extensions other OpenAI-compatible servers also accept.
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1 disables")
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0, description="1 disables; > 1 discourages repeats")
    prediction: Prediction | None = Field(None, description="text the answer is expected to repeat (greedy only)")

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop has {len(stops)} strings: send at most {MAX_STOPS}", param="stop")
        return stops


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=65536)]


class CompletionRequest(SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=64)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=64)] = Field(
            description="a string, a list of strings, a list of token ids, or a list of token id lists")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class Message(Body):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    # Accepted so that clients sending the defaults work; what would change the answer is refused (service.py).
    response_format: ResponseFormat | None = Field(None, description="only {\"type\": \"text\"} is supported")
    tool_choice: Literal["none", "auto", "required"] | dict | None = Field(
        None, description="tools are ignored: \"required\" or a named function is refused")
