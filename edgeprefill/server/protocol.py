"""OpenAI's request and response shapes for the server: a request body checked field by field
into a `Request` (a bad field is an `ApiError` naming it), and the JSON the answers go back in.

Nothing here touches the model or the web framework; the engine runs a `Request`, the app moves
bytes.
"""

import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from edgeprefill.errors import EdgeprefillError
from edgeprefill.generate import check_stop

# the strategy options a client may set per request ("prefill": {...}); paths and processes
# (kvp, draft, workers, hostfile) are the server's to choose, on its command line
REQUEST_OPTIONS = {"keep": (int, float), "filter_layer": (int,), "kvp_tail": (int,),
                   "lookahead": (int,), "select_chunk": (int,), "positions": (str,),
                   "chunk_size": (int,)}
# fields clients send that change nothing here
IGNORED = {"model", "user", "metadata", "store", "service_tier", "prompt_cache_key",
           "safety_identifier", "parallel_tool_calls", "stream_options"}
ROLES = {"system", "developer", "user", "assistant"}


class ApiError(Exception):
    """An OpenAI-shaped error: HTTP status, message, type, the field at fault and a code."""

    def __init__(self, status, message, param=None, code=None, type_=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "invalid_request_error",
                              404: "invalid_request_error", 413: "invalid_request_error",
                              503: "server_overloaded"}.get(status, "server_error")

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Request:
    """A checked generation request, ready for the engine."""

    ids: list
    chat: bool
    max_tokens: int
    temp: float
    top_p: float
    seed: Optional[int]
    stop: list
    stream: bool
    include_usage: bool
    strategy: str
    options: dict = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Defaults:
    """What a request leaves out: the server's command-line settings."""

    strategy: str = "full"
    max_tokens: int = 512
    temp: float = 0.0
    top_p: float = 1.0


def _bad(param, message):
    return ApiError(400, message, param=param, code="invalid_value")


def _number(body, name, default, lo, hi, kinds=(int, float), lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise _bad(name, f"{name} must be a number (got {v!r})")
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(name, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}] (got {v})")
    return v


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"{name} must be true or false (got {v!r})")
    return v


def _text(content, where):
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(
                    p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise _bad(where, f"{where}: only text parts are supported (got {kind!r})")
            parts.append(p["text"])
        return "".join(parts)
    raise _bad(where, f"{where} must be a string or a list of text parts")


def _check_unsupported(body):
    """Fields whose effect this server does not offer: refused, never silently dropped."""
    if body.get("n", 1) != 1:
        raise _bad("n", "n must be 1: this server returns one choice per request")
    for name in ("logprobs", "echo"):
        if body.get(name):
            raise _bad(name, f"{name} is not supported: drop it")
    if body.get("tools") or body.get("functions"):
        raise _bad("tools", "tools are not supported: drop them")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _bad(name, f"{name} is not supported: drop it or pass 0")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "logit_bias is not supported: drop it")
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise _bad("response_format", "response_format must be {\"type\": \"text\"}: "
                   "structured output is not supported")
    if body.get("suffix"):
        raise _bad("suffix", "suffix is not supported: drop it")


def _prefill(body, defaults):
    """The extra "prefill" field: {"strategy": NAME, option: value, ...}."""
    from edgeprefill.prefill import registry

    spec = body.get("prefill")
    if spec is None:
        return defaults.strategy, {}
    if not isinstance(spec, dict):
        raise _bad("prefill", 'prefill must be an object like {"strategy": "kvp"}')
    name = spec.get("strategy", defaults.strategy)
    try:
        strategy, _ = registry.parse(name)
    except EdgeprefillError as e:
        raise _bad("prefill.strategy", str(e)) from None
    options = {}
    for k, v in spec.items():
        if k == "strategy":
            continue
        if k not in REQUEST_OPTIONS:
            raise _bad(f"prefill.{k}", f"prefill.{k} cannot be set per request: choose from "
                       f"{', '.join(sorted(REQUEST_OPTIONS))} (the rest are the server's "
                       "command-line flags)")
        if k not in strategy.options:
            raise _bad(f"prefill.{k}", f"strategy {name} takes no {k} option: drop it")
        if isinstance(v, bool) or not isinstance(v, REQUEST_OPTIONS[k]):
            raise _bad(f"prefill.{k}", f"prefill.{k} has the wrong type (got {v!r})")
        options[k] = v
    return name, options


def _common(body, ids, chat, defaults, window):
    known = IGNORED | {"messages", "prompt", "max_tokens", "max_completion_tokens",
                      "temperature", "top_p", "seed", "stop", "stream", "prefill", "n",
                      "logprobs", "echo", "tools", "functions", "frequency_penalty",
                      "presence_penalty", "logit_bias", "response_format", "suffix",
                      "tool_choice", "top_logprobs"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise _bad(unknown[0], f"unknown field {unknown[0]!r}: drop it (this server takes "
                   "OpenAI's fields and \"prefill\")")
    _check_unsupported(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", defaults.max_tokens, 1,
                         10**9, kinds=(int,))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise _bad("seed", f"seed must be a non-negative integer (got {seed!r})")
    try:
        stop = check_stop(body.get("stop"))
    except EdgeprefillError as e:
        raise _bad("stop", str(e)) from None
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise _bad("stream_options", "stream_options must be an object")
    if len(ids) >= window:
        raise ApiError(413, f"the prompt has {len(ids)} tokens but the model's context is "
                       f"{window}: shorten it", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    strategy, options = _prefill(body, defaults)
    return Request(ids=ids, chat=chat, max_tokens=max_tokens,
                   temp=_number(body, "temperature", defaults.temp, 0, 2),
                   top_p=_number(body, "top_p", defaults.top_p, 0, 1, lo_open=True),
                   seed=seed, stop=stop, stream=_bool(body, "stream"),
                   include_usage=bool(so.get("include_usage")), strategy=strategy,
                   options=options)


def parse_chat(body, tokenizer, defaults, window):
    """A /v1/chat/completions body -> Request (the messages through the chat template)."""
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list of {\"role\", \"content\"}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}].role", f"messages[{i}].role must be one of "
                       f"{', '.join(sorted(ROLES))}")
        role = "system" if m["role"] == "developer" else m["role"]
        turns.append({"role": role, "content": _text(m.get("content"),
                                                     f"messages[{i}].content")})
    if not getattr(tokenizer, "chat_template", None):
        raise _bad("messages", "this model has no chat template: use /v1/completions")
    ids = list(tokenizer.apply_chat_template(turns, add_generation_prompt=True))
    return _common(body, ids, True, defaults, window)


def parse_completion(body, tokenizer, defaults, window, vocab_size):
    """A /v1/completions body -> Request (the prompt as text, or token ids, as given)."""
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        ids = list(tokenizer.encode(prompt))
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise _bad("prompt", f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
        ids = list(prompt)
    else:
        raise _bad("prompt", "prompt must be a non-empty string or list of token ids (one "
                   "prompt per request)")
    if not ids:
        raise _bad("prompt", "the prompt encodes to no tokens")
    return _common(body, ids, False, defaults, window)


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


def prefill_field(summary):
    """The "prefill" field beside "usage": the strategy and where the time went."""
    keys = ("strategy", "prefilled_with", "exact", "ttft_ms", "prefill_ms", "queue_ms",
            "cached_tokens")
    return {k: summary[k] for k in keys if k in summary}


def usage(summary):
    p, c = summary["prompt_tokens"], summary["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": summary.get("cached_tokens", 0)}}


def response(req, model_id, text, summary):
    """The non-streaming body."""
    finish = FINISH.get(summary["finish_reason"], "stop")
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": ("chatcmpl-" if req.chat else "cmpl-") + req.id,
            "object": "chat.completion" if req.chat else "text_completion",
            "created": req.created, "model": model_id, "system_fingerprint": "edgeprefill",
            "choices": [choice], "usage": usage(summary), "prefill": prefill_field(summary)}


def chunk(req, model_id, text=None, finish=None, summary=None, role=False, usage_only=False):
    """One server-sent event's body while streaming."""
    if usage_only:
        choices = []
    elif req.chat:
        delta = {"role": "assistant", "content": ""} if role else (
            {"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    body = {"id": ("chatcmpl-" if req.chat else "cmpl-") + req.id,
            "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": req.created, "model": model_id, "system_fingerprint": "edgeprefill",
            "choices": choices}
    if summary is not None:
        body["prefill"] = prefill_field(summary)
        if usage_only:
            body["usage"] = usage(summary)
    return body
