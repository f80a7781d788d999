"""The OpenAI wire format of `kiln serve`: request bodies, their checks, and the JSON objects
sent back.

Bodies are parsed here rather than by the web framework, so that every mistake (bad JSON, a
wrong type, a value out of range, a prompt that does not fit) becomes one OpenAI-style error
object naming the field, in a fixed order: JSON, types, then meaning. Value ranges are left to
`SamplingParams.validate`, the same check the Python API uses; only limits that are the API's
own (n, logprob counts, penalty ranges, seed >= 0, the context) are checked here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from kiln.runtime.errors import KilnError
from kiln.runtime.sampler import SamplingParams, TokenLogprob

MAX_N = 128  # choices per request, as OpenAI allows
MAX_LOGPROBS = 20  # alternatives per token
# Ranges the API sets beyond SamplingParams' own checks: OpenAI's for presence and frequency;
# repetition_penalty divides logits, so a tiny one overflows them to infinity.
_RANGES = {
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.01, 100.0),
}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the context
# What a field of union type must be, for the error message (pydantic lists every alternative).
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of such lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of content parts",
}
# Fields Kiln does not implement: accepted only at a value that changes nothing.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v is None,
    "logit_bias": lambda v: not v,
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or v == {"type": "text"},
}


class ApiError(Exception):
    """A request the server refuses, as OpenAI reports it: HTTP status plus an error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    @classmethod
    def from_kiln(cls, error: KilnError) -> ApiError:
        """A user mistake the runtime found (a SamplingParams range, an empty prompt, ...)."""
        message = str(error)
        named = re.match(r"SamplingParams\.(\w+) ", message)
        message = message.replace("SamplingParams.", "", 1) if named else message
        return cls(400, message, param=named.group(1) if named else None)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request bodies ---------------------------------------------------------------------------


class _Body(BaseModel):
    # strict: "5" is not an integer and 1 is not a boolean. Unknown fields are ignored, as
    # OpenAI clients send some (user, metadata, ...) that do not change the output.
    model_config = ConfigDict(strict=True, extra="allow")


B = TypeVar("B", bound=_Body)


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # alternatives per token (the legacy completions form)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes, kind: type[B]) -> B:
    """The request body as `kind`, or ApiError(400) naming the first problem."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"The request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        body = kind.model_validate(data)
    except ValidationError as e:
        raise _type_error(e) from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply.") from None
    for name, allowed in _UNSUPPORTED.items():
        if name in data and not allowed(data[name]):
            raise ApiError(400, f"{name} is not supported by this server.", param=name)
    if body.stream_options is not None and not body.stream:
        raise ApiError(
            400, "stream_options is only allowed when stream is true.", param="stream_options"
        )
    return body


def _type_error(error: ValidationError) -> ApiError:
    first = error.errors()[0]
    path: list[str] = []
    union = False
    for part in first["loc"]:
        if isinstance(part, int):
            path.append(f"[{part}]")
        elif part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper():
            union = True  # pydantic names the union member it tried: the field ends here
            break
        else:
            path.append(("." if path else "") + part)
    param = "".join(path)
    name = next((p for p in reversed(first["loc"]) if isinstance(p, str) and p in _EXPECTED), "")
    if union and name:
        message = f"{param} must be {_EXPECTED[name]}"
    elif first["type"] == "missing":
        message = f"{param} is required"
    else:
        message = f"{param}: {first['msg']}"
    if first["type"] != "missing":
        message += f" (got {_short(first['input'])})"
    return ApiError(400, message + ".", param=param or None)


def _short(value: Any) -> str:
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


# -- from a body to engine requests -----------------------------------------------------------


@dataclass
class Job:
    """What one HTTP request asks the engine for: a prompt and sampling per choice."""

    prompts: list[list[int]]  # token ids of each prompt (completions may send several)
    choices: list[tuple[int, SamplingParams]] = field(default_factory=list)  # (prompt, params)
    stream: bool = False
    include_usage: bool = False


def chat_messages(body: ChatRequest) -> list[dict[str, Any]]:
    """The messages as the chat template reads them: content parts joined into one string."""
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise ApiError(
                        400,
                        f"messages[{i}].content[{j}] is a {part.type!r} part; this server "
                        "takes text parts only.",
                        param=f"messages[{i}].content",
                    )
            content = "".join(part.text or "" for part in content)
        message: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    if not messages:
        raise ApiError(400, "messages must hold at least one message.", param="messages")
    return messages


def build_job(
    body: CompletionRequest | ChatRequest,
    prompts: list[list[int]],
    context_length: int,
    max_choices: int,
) -> Job:
    """Check the prompts against the context and turn the body's options into
    SamplingParams, one per choice (a seeded request's choice i uses seed + i)."""
    chat = isinstance(body, ChatRequest)
    n = _n(body.n, len(prompts), max_choices)
    if body.seed is not None and body.seed < 0:
        raise ApiError(400, f"seed is {body.seed}; it must be an integer >= 0.", param="seed")
    for name, (low, high) in _RANGES.items():
        value = getattr(body, name)
        if value is not None and not low <= value <= high:
            raise ApiError(
                400, f"{name} is {value}; it must lie in [{low:g}, {high:g}].", param=name
            )
    logprobs = _logprobs(body)
    requested, name = body.max_tokens, "max_tokens"
    if chat and body.max_completion_tokens is not None:
        requested, name = body.max_completion_tokens, "max_completion_tokens"
    job = Job(prompts, stream=bool(body.stream))
    job.include_usage = bool(body.stream_options and body.stream_options.include_usage)
    for p, ids in enumerate(prompts):
        room = context_length - len(ids)
        if room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {context_length} tokens, and the "
                f"prompt has {len(ids)}: shorten it to leave room for at least one generated "
                "token.",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        if requested is None:
            max_tokens = room if chat else min(COMPLETION_MAX_TOKENS, room)
        elif requested > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {context_length} tokens; the prompt "
                f"has {len(ids)}, which leaves room for {room}, but {name} is {requested}.",
                param=name,
                code="context_length_exceeded",
            )
        else:
            max_tokens = requested
        for i in range(n):
            seed = None if body.seed is None else body.seed + i
            job.choices.append((p, _params(body, max_tokens, seed, logprobs)))
    return job


def _n(n: int | None, prompts: int, max_choices: int) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n is {n}; it must lie in [1, {MAX_N}].", param="n")
    if n * prompts > max_choices:
        raise ApiError(
            400,
            f"This request asks for {n * prompts} generations; this server runs and queues at "
            f"most {max_choices} at once.",
            param="n",
        )
    return n


def _logprobs(body: CompletionRequest | ChatRequest) -> int | None:
    """Alternatives per token for SamplingParams.logprobs (None: no logprobs)."""
    if isinstance(body, ChatRequest):
        top, name = body.top_logprobs, "top_logprobs"
        if top is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true.", param=name)
        wanted = (top or 0) if body.logprobs else None
    else:
        wanted, name = body.logprobs, "logprobs"
    if wanted is not None and not 0 <= wanted <= MAX_LOGPROBS:
        raise ApiError(400, f"{name} is {wanted}; it must lie in [0, {MAX_LOGPROBS}].", param=name)
    return wanted


def _params(
    body: CompletionRequest | ChatRequest, max_tokens: int, seed: int | None, logprobs: int | None
) -> SamplingParams:
    if body.top_k == -1:
        body = body.model_copy(update={"top_k": 0})  # -1 turns top-k off in vLLM's API
    given = {
        name: getattr(body, name)
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        )
        if getattr(body, name) is not None
    }
    try:
        return SamplingParams(
            **given,
            max_tokens=max_tokens,
            seed=seed,
            stop=body.stop or (),
            logprobs=logprobs,
        )
    except KilnError as e:
        raise ApiError.from_kiln(e) from None


# -- response objects -------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _finite(logprob: float) -> float:
    # JSON has no -Infinity; OpenAI-compatible servers send -9999 for "impossible".
    return logprob if math.isfinite(logprob) else -9999.0


class LogprobFormatter:
    """Token log-probabilities in the completions form (parallel lists) or the chat form (one
    object per token); `token_text` renders a token id as text."""

    def __init__(self, token_text: Any, kind: Literal["completion", "chat"]):
        self.token_text = token_text
        self.kind = kind
        self.offset = 0  # completions: where the next token's text starts in the choice's text

    def format(self, items: list[TokenLogprob]) -> dict[str, Any]:
        if self.kind == "chat":
            return {"content": [self._chat_entry(lp) for lp in items], "refusal": None}
        out: dict[str, Any] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for lp in items:
            text = self.token_text(lp.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(lp.logprob))
            out["top_logprobs"].append({self.token_text(t): _finite(v) for t, v in lp.top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def _chat_entry(self, lp: TokenLogprob) -> dict[str, Any]:
        entry = self._token(lp.token, lp.logprob)
        entry["top_logprobs"] = [self._token(t, v) for t, v in lp.top]
        return entry

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}
