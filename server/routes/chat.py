"""POST /v1/chat/completions: OpenAI's chat shapes over the completion path.

The messages are rendered as one plain text (``server.chat``: these are base models, not chat models),
which is then a completion's prompt in every way (the same sampling controls, seeds, stop strings, the
template's turn markers added to them); only the answer's shape differs: ``chat.completion`` objects, or
``chat.completion.chunk`` events whose first delta gives the role."""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, List, Optional, Tuple

from fastapi import APIRouter, Request

from .. import requests as rq
from ..body import read_json
from ..chat import ChatTemplate
from ..controls import sampling_params
from ..responses import sse
from ..state import Channel, State
from . import check_model, state_of
from .completions import MAX_N, MAX_STOP_CHARS, MAX_TOKENS, Completion, _Answer, serve, stream_usage, step_events

#: max_tokens when a request gives neither max_tokens nor max_completion_tokens
DEFAULT_MAX_TOKENS = 256
#: the most top_logprobs (OpenAI's limit for chat)
MAX_TOP_LOGPROBS = 20
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

router = APIRouter()


def messages_of(body: dict) -> List[Tuple[str, str]]:
    """(role, text) of each message; a content may be a string or a list of text parts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise rq.ApiError(400, "messages is required: a non-empty list of {role, content} objects",
                          param="messages", code="missing_required_parameter" if messages is None else "invalid_value")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise rq.bad("messages", f"{where} must be an object with role and content")
        role = ROLES.get(m.get("role"))
        if role is None:
            raise rq.bad("messages", f"{where}.role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise rq.bad("messages", f"{where}.content: only text parts ({{type: text, text}}) are supported")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise rq.bad("messages", f"{where}.content must be a string or a list of text parts")
        out.append((role, content))
    return out


def parse(state: State, body: dict, template: ChatTemplate) -> Completion:
    check_model(state, body)
    prompt = template.render(messages_of(body))
    n = rq.integer(body, "n", 1, 1, MAX_N)
    max_tokens = rq.integer(body, "max_completion_tokens", None, 0, MAX_TOKENS)
    if max_tokens is None:
        max_tokens = rq.integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 0, MAX_TOKENS)
    max_length = rq.integer(body, "max_length", None, 0, MAX_TOKENS)
    params = sampling_params(body, state.hparams, state.enc)
    seed = rq.integer(body, "seed", None, 0, 2 ** 64 - 1)
    stop = rq.stops(body, MAX_STOP_CHARS)
    stop = stop + tuple(s for s in template.stop if s not in stop)
    stream = rq.boolean(body, "stream", False)
    include_usage = stream_usage(body, stream)
    logprobs = rq.boolean(body, "logprobs", False)
    top = rq.integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise rq.bad("top_logprobs", "needs logprobs: true")
    return Completion([prompt], n, max_tokens, max_length, params, seed, stop, stream, False,
                      (top or 0) if logprobs else None, include_usage)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state = state_of(request)
    t0 = time.monotonic()
    body = await read_json(request, state.config)
    c = parse(state, body, state.config.chat_template)
    return await serve(request, state, c, t0, "/v1/chat/completions", _ChatAnswer)


class _ChatAnswer(_Answer):
    """chat.completion objects and chat.completion.chunk events."""

    def __init__(self, *args):
        super().__init__(*args)
        self.id = "chatcmpl-" + uuid.uuid4().hex

    def base(self, choices, chunk: bool = False) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": self.created, "model": self.state.config.model_name, "system_fingerprint": None,
                "choices": choices}

    def delta(self, k: int, delta: dict, finish_reason: Optional[str] = None, logprobs=None) -> dict:
        return self.base([{"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
                         chunk=True)

    def entries(self, k: int, chars: int) -> Optional[dict]:
        """The chat shape of the log-probabilities of ``chars`` more characters of choice k (None: not asked)."""
        if self.c.logprobs is None:
            return None
        enc = self.state.enc
        content = []
        for piece, _, value, top, _ in self.cursors[k].advance(self.jobs[k], chars, enc):
            tops = []
            for t, v in top:
                text = enc.decode([t])
                tops.append({"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))})
            content.append({"token": piece, "logprob": value, "bytes": list(piece.encode("utf-8")),
                            "top_logprobs": tops})
        return {"content": content, "refusal": None}

    async def stream(self, channel: Channel) -> AsyncIterator[str]:
        first = []
        for k, job in enumerate(self.jobs):
            first.append(sse(self.delta(k, {"role": "assistant", "content": ""})))
            if job is None:
                first.append(sse(self.delta(k, {}, "length")))
        yield "".join(first)
        async for events in step_events(self.state, self.jobs, channel):
            out = []
            for kind, k, data in events:
                if kind == "text":
                    out.append(sse(self.delta(k, {"content": data}, None, self.entries(k, len(data)))))
                elif kind == "done":
                    out.append(sse(self.delta(k, {}, data)))
                else:
                    out.append(sse(data.body()))
            yield "".join(out)
        if self.c.include_usage:
            yield sse({**self.base([], chunk=True), "usage": self.usage()})
        yield "data: [DONE]\n\n"

    async def collect(self, channel: Channel) -> dict:
        texts, reasons = await self.gather(channel)
        choices = []
        for k, job in enumerate(self.jobs):
            lp = self.entries(k, len(texts[k])) if job is not None else (
                None if self.c.logprobs is None else {"content": [], "refusal": None})
            choices.append({"index": k, "message": {"role": "assistant", "content": texts[k], "refusal": None},
                            "logprobs": lp, "finish_reason": reasons[k]})
        return {**self.base(choices), "usage": self.usage()}
