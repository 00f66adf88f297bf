"""The OpenAI wire format as pure functions: request bodies in, typed requests out (or an
`ApiError` naming the bad parameter); responses, stream chunks and errors shaped as the
official clients expect them. Nothing here touches the network or the gateway."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aerie.params import MAX_SEED

MAX_STOP_STRINGS = 4

# Fields the OpenAI clients may send that change nothing here; accepted and ignored.
_IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
# Fields with behaviour we do not have: accepted only at their neutral value, so that a
# request never silently gets something other than what it asked for.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None, True),
    "modalities": (None, ["text"]), "reasoning_effort": (None,), "prediction": (None,), "audio": (None,),
    "web_search_options": (None,), "verbosity": (None,),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "stream_options", "n", "stop"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
_ROLES = {"system", "developer", "user", "assistant"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


@dataclass
class GenerationRequest:
    """One /v1/completions or /v1/chat/completions request, checked."""

    chat: bool
    model: str
    prompt: str = ""  # completions, text
    prompt_ids: list[int] = field(default_factory=list)  # completions, token ids
    messages: list[dict[str, str]] = field(default_factory=list)  # chat: role and text content
    max_tokens: int = 0  # 0: the gateway's default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None: a fresh random seed
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(None, f"the request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_json")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"{name} must be a number")
    if not lo <= value <= hi:
        raise invalid(name, f"{name} must be between {lo:g} and {hi:g}, got {value}")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"{name} must be an integer")
    if value < lo or (hi is not None and value > hi):
        raise invalid(name, f"{name} must be {'at least ' + str(lo) if hi is None else f'between {lo} and {hi}'},"
                            f" got {value}")
    return value


def _top_p(body: dict) -> float:
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise invalid("top_p", "top_p must be above 0 (use temperature 0 for greedy decoding)")
    return top_p


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"{name} must be true or false")
    return value


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in _IGNORED:
            continue
        if name in _NEUTRAL:
            if value not in _NEUTRAL[name]:
                raise invalid(name, f"{name} is not supported by this server", "unsupported_parameter")
            continue
        raise invalid(name, f"unrecognized request argument: {name}", "unrecognized_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid("stop", "stop must be a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise invalid("stop", f"stop takes at most {MAX_STOP_STRINGS} strings")
    if any(not s for s in items):
        raise invalid("stop", "stop strings must not be empty")
    return tuple(dict.fromkeys(items))


def _common(body: dict, chat: bool) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "model is required (see GET /v1/models)", "missing_required_parameter")
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise invalid("n", "only n=1 is supported: send one request per completion", "unsupported_value")
    max_tokens = _integer(body, "max_tokens", 1)
    if chat:
        newer = _integer(body, "max_completion_tokens", 1)
        if newer is not None and max_tokens is not None and newer != max_tokens:
            raise invalid("max_completion_tokens", "max_tokens and max_completion_tokens disagree")
        max_tokens = newer if newer is not None else max_tokens
    top_k = _integer(body, "top_k", -1)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options", "stream_options needs stream: true")
        if not isinstance(options, dict):
            raise invalid("stream_options", "stream_options must be an object")
        include_usage = _bool(options, "include_usage")
    return GenerationRequest(
        chat=chat, model=model, max_tokens=max_tokens or 0,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(body), top_k=max(0, top_k or 0),  # vLLM's top_k -1 means off, as 0 does here
        seed=_integer(body, "seed", 0, MAX_SEED), stream=stream,
        include_usage=include_usage, stop=_stop(body),
    )


def _token_list(value: list, param: str) -> list[int]:
    if not value or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise invalid(param, f"{param} must be a non-empty list of token ids >= 0")
    return list(value)


def parse_completion(body: dict) -> GenerationRequest:
    _check_fields(body, _COMPLETION_FIELDS)
    req = _common(body, chat=False)
    prompt = body.get("prompt")
    # One prompt per request: a text, token ids, or a list holding exactly one of those.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt", "prompt is empty")
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("prompt", "only one prompt per request is supported", "unsupported_value")
    elif isinstance(prompt, list):
        req.prompt_ids = _token_list(prompt, "prompt")
    else:
        raise invalid("prompt", "prompt is required: a string or a list of token ids", "missing_required_parameter")
    return req


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(where, "only text content parts are supported", "unsupported_value")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(where, "content must be a string or a list of text parts")


def parse_chat(body: dict) -> GenerationRequest:
    _check_fields(body, _CHAT_FIELDS)
    req = _common(body, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list", "missing_required_parameter")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"{where} must be an object")
        role = m.get("role")
        if role not in _ROLES:
            raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(sorted(_ROLES))}")
        if m.get("tool_calls") or m.get("function_call"):
            raise invalid(where, "tool calls are not supported", "unsupported_value")
        # Chat templates know system, user and assistant; OpenAI's newer `developer` is a system message.
        req.messages.append({"role": "system" if role == "developer" else role,
                             "content": _content(m.get("content"), f"{where}.content")})
    return req


# --- responses -----------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(gateway_reason: str, stopped_at_string: bool) -> str:
    """OpenAI's finish_reason for the gateway's: `length` at max_tokens, otherwise `stop` (an
    end-of-sequence token, a stop string, or a cancellation)."""
    if stopped_at_string:
        return "stop"
    return "length" if gateway_reason == "length" else "stop"


def response_id(chat: bool, session_id: str) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + session_id


def completion_body(req: GenerationRequest, rid: str, created: int, text: str, reason: str,
                    counts: dict) -> dict:
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice], "usage": counts}


def chunk_body(req: GenerationRequest, rid: str, created: int, text: str | None, reason: str | None,
               first: bool = False) -> dict:
    """One stream chunk; `text` None with a reason is the final chunk of the choice."""
    if req.chat:
        delta: dict = {"role": "assistant", "content": text or ""} if first else (
            {"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: GenerationRequest, rid: str, created: int, counts: dict) -> dict:
    obj = "chat.completion.chunk" if req.chat else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [], "usage": counts}


def models_body(names: list[str], created: int) -> dict:
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "aerie"} for n in names]}


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# --- stop strings ---------------------------------------------------------------------------


class StopScanner:
    """Cuts streamed text at the first stop string. Text that might be the start of a stop
    string is held back until the next piece shows whether it is, so no client ever sees any
    part of a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is safe to send after `piece`; once a stop string is found, the
        text before it and `stopped` is True."""
        if self.stopped:
            return ""
        self._pending += piece
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        cut = len(self._pending) - self._hold
        if cut <= 0:
            return ""
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """What is left at the end of the generation (no stop string came)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
