"""OpenAI's request bodies (the fields this server honours; any other is refused by name), its error body,
and its log-probability objects, for dsmoe.infer.server.

Log-probabilities are the model's own (log-softmax of the raw logits over its whole embedding, as its
training loss and transformers compute them, and as vLLM reports them by default), before temperature,
top-k/top-p, penalties and logit_bias. A token is named by its text, or "bytes:\\xNN..." when it is part
of a UTF-8 character and not text on its own.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from dsmoe.infer.engine import Sequence
from dsmoe.infer.sampling import MAX_LOGPROBS

Number = Annotated[float, Field(strict=True)]  # strict: "0.5" (a string) is refused, 1 (an int) is taken
MAX_N = 16  # completions per prompt (each one a row of the batch)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class Sampling(BaseModel):
    """Fields shared by completions and chat completions. Unknown fields are refused, never ignored."""
    model_config = ConfigDict(extra="forbid")
    model: Optional[StrictStr] = None
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=-1, description="0 or -1 = off")
    repetition_penalty: Number = Field(1.0, gt=0)
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[StrictStr, Number]] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    n: StrictInt = Field(1, ge=1, le=MAX_N, description="completions per prompt; with a seed, prompt i's choice j "
                                                        "draws from prompt_seed(seed, i * n + j)")
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[StrictStr] = None  # an end-user id for the caller's own records; changes nothing here


class CompletionRequest(Sampling):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    max_tokens: StrictInt = Field(16, ge=1)
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: Optional[StrictInt] = Field(None, ge=1)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)


def error(status: int, message: str, param: Optional[str] = None, kind: Optional[str] = None,
          code: Optional[str] = None) -> JSONResponse:
    """OpenAI's error body; `kind` defaults to invalid_request_error for 4xx, server_error for 5xx."""
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400, naming the first offending field (or `body` for broken JSON)."""
    first = exc.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return error(400, f"the request body is not valid JSON ({detail})", "body")
    param = loc[0] if loc else "body"
    if first.get("type") == "extra_forbidden":
        return error(400, f"{'.'.join(loc)}: this server does not support this field; leave it out", param)
    got = f" (got {first['input']!r})" if loc and first.get("type") != "missing" and "input" in first else ""
    return error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}{got}", param)


def http_error(_: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's errors (unknown route, wrong method, a body that cannot be parsed) in OpenAI's shape."""
    if exc.status_code == 404:
        return error(404, "no such route: the API is POST /v1/completions, POST /v1/chat/completions, "
                          "GET /v1/models, GET /health", None, code="not_found")
    if exc.status_code == 400:  # FastAPI's "error parsing the body": bytes not UTF-8, JSON nested too deep
        return error(400, f"the request body could not be parsed ({exc.detail}): send a UTF-8 JSON object", "body")
    return error(exc.status_code, str(exc.detail), None)


def server_error(_: Request, exc: Exception) -> JSONResponse:
    return error(500, f"the server failed on this request ({type(exc).__name__}); its log has the traceback")


def token_text(tok, token: int) -> str:
    """A token's text, or "bytes:\\xNN..." when its bytes are not text on their own (part of a character)."""
    if token == tok.eot_id:
        return "<|endoftext|>"
    enc = getattr(tok, "_encoding", None)  # tiktoken: the token's exact bytes
    raw = enc.decode_single_token_bytes(token) if enc is not None else bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _top(tok, top: Optional[dict[int, float]]) -> Optional[dict[str, float]]:
    if top is None:
        return None
    out: dict[str, float] = {}
    for t, v in top.items():  # most likely first: two ids with one text keep the likelier
        out.setdefault(token_text(tok, t), v)
    return out


def completion_logprobs(tok, seq: Sequence, echo: bool, start: int = 0, end: Optional[int] = None,
                        offset: int = 0) -> dict:
    """/v1/completions' `logprobs` for the output tokens [start, end) (with `echo`, the prompt's tokens
    first, the first one null); `offset` is the text offset of the first one."""
    ids, lps, tops = seq.scored[start:end], seq.logprobs[start:end], seq.top_logprobs[start:end]
    if echo:
        ids = seq.prompt + ids
        lps = [None] + seq.prompt_logprobs + lps
        tops = [None] + seq.prompt_top_logprobs + tops
    tokens = [token_text(tok, t) for t in ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t) if not t.startswith("bytes:") else 1
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": [_top(tok, t) for t in tops],
            "text_offset": offsets}


def chat_logprobs(tok, seq: Sequence, start: int = 0, end: Optional[int] = None) -> dict:
    """/v1/chat/completions' `logprobs` for the output tokens [start, end)."""
    def entry(t: int, lp: float) -> dict:
        text = token_text(tok, t)
        raw = list(text.encode("utf-8")) if not text.startswith("bytes:") else \
            [int(h, 16) for h in text[len("bytes:"):].split("\\x")[1:]]
        return {"token": text, "logprob": lp, "bytes": raw}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(u, v) for u, v in top.items()]}
                        for t, lp, top in zip(seq.scored[start:end], seq.logprobs[start:end],
                                              seq.top_logprobs[start:end])]}
