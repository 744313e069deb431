"""Request bodies of the OpenAI API subset the server speaks, and its error shape.

Validation is strict (no "5" for 5, no 1 for true), so a client bug surfaces as a 400 naming the field instead of
a silently coerced value. Fields OpenAI defines that the server does not use (user, tools, ...) are accepted and
ignored, as other OpenAI-compatible servers do; the ones that would change the answer are refused.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


Stop = Annotated[str, Field(min_length=1)]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Prediction(BaseModel):
    """OpenAI's predicted outputs: text the answer is expected to repeat (a file being edited, say). Greedy
    requests check it several tokens per step; the answer is the same, sooner when the prediction is right."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["content"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(strict=True, extra="ignore")

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
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=64)] = Field(
            description="a string, a list of strings, a list of token ids, or a list of token id lists")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
