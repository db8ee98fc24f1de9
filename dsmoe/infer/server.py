"""An OpenAI-compatible completions server on FastAPI, with a web page at `/`.

    POST /v1/completions   prompt, max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed,
                           stream (server-sent events ending in `data: [DONE]`), stream_options.include_usage
    GET  /v1/models        the one model served
    GET  /health           status, running / waiting requests, slots, peak batch, finished requests
    GET  /                 a page to try prompts: settings, streamed output, tokens/s

Every request is decoded by one Scheduler together with the others in flight. A bad request gets a
4xx JSON error in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with `param`
naming the offending field; a client that disconnects has its request dropped and its row freed.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from dsmoe.infer.engine import Batch, Sequence, context_error
from dsmoe.infer.sampling import SamplingParams
from dsmoe.infer.scheduler import QueueFull, Scheduler

PAGE = Path(__file__).with_name("static") / "index.html"
POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
Number = Annotated[float, Field(strict=True)]  # strict: "0.5" (a string) is refused, 1 (an int) is taken


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """The fields of OpenAI's /v1/completions this server honours (others are accepted and ignored)."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[StrictStr] = None
    prompt: StrictStr
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=-1, description="0 or -1 = off")
    repetition_penalty: Number = Field(1.0, gt=0)
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[StrictInt] = None
    n: StrictInt = Field(1, ge=1, le=1, description="one completion per request")
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None


def error(status: int, message: str, param: Optional[str], kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400, naming the first offending field (or `body` for broken JSON)."""
    first = exc.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return error(400, f"the request body is not valid JSON ({detail})", "body")
    param = loc[0] if loc else "body"
    got = f" (got {first['input']!r})" if loc and first.get("type") != "missing" and "input" in first else ""
    return error(400, f"{param}: {first.get('msg')}{got}", param)


def create_app(batch: Batch, model_name: str, max_waiting: int = 256) -> FastAPI:
    """The app serving `batch`'s model (its tokenizer is needed) under the id `model_name`."""
    if batch.tokenizer is None:
        raise ValueError("the server needs the model's tokenizer: build the Batch with tokenizer=")
    scheduler = Scheduler(batch, max_waiting)
    tok, context, created = batch.tokenizer, batch.cache.capacity, int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="dsmoe", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.state.scheduler = scheduler

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text().replace("{{MODEL}}", model_name).replace("{{CONTEXT}}", str(context))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name, **scheduler.snapshot()}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dsmoe", "max_model_len": context}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.model not in (None, model_name):
            return error(404, f"model '{req.model}' is not served here; this server serves '{model_name}'",
                         "model", "model_not_found")
        ids = tok.encode(req.prompt) or [tok.eot_id]
        problem = context_error(len(ids), req.max_tokens, context)
        if problem:
            return error(400, problem, "prompt" if len(ids) >= context else "max_tokens")
        try:
            params = SamplingParams(max_new_tokens=req.max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0),
                                    top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                                    stop=tuple([req.stop] if isinstance(req.stop, str) else req.stop or ()),
                                    seed=req.seed)
        except ValueError as e:  # the message starts with the field's name
            return error(400, str(e), str(e).split("=")[0])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seq = batch.new_sequence(ids, params, lambda s, piece: loop.call_soon_threadsafe(
            events.put_nowait, (piece, s.finish_reason)))
        try:
            scheduler.submit(seq)
        except QueueFull as e:
            return error(503, str(e), None, "server_busy")
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": len(seq.out),  # noqa: E731
                         "total_tokens": len(ids) + len(seq.out)}
        if req.stream:
            return StreamingResponse(sse(scheduler, seq, events, head, usage,
                                         bool(req.stream_options and req.stream_options.include_usage)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        while seq.finish_reason is None:
            try:
                await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(seq)
                    return error(499, "the client closed the request", None)
        if seq.finish_reason == "error":
            return error(500, "decoding failed; the server log has the traceback", None, "server_error")
        return {**head, "choices": [{"index": 0, "text": seq.text, "logprobs": None,
                                     "finish_reason": seq.finish_reason}], "usage": usage()}

    return app


async def sse(scheduler: Scheduler, seq: Sequence, events: asyncio.Queue, head: dict, usage, include_usage: bool):
    """Server-sent events: a chunk per piece of text, one with the finish reason, [DONE]. Leaving early
    (the client disconnected: the response task is cancelled) drops the request from the batch."""
    def chunk(text: str, finish: Optional[str]) -> str:
        return "data: " + json.dumps({**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                            "finish_reason": finish}]}) + "\n\n"
    try:
        while True:
            piece, finish = await events.get()
            if finish == "error":
                yield "data: " + json.dumps({"error": {"message": "decoding failed; the server log has the traceback",
                                                       "type": "server_error", "param": None, "code": None}}) + "\n\n"
                break
            if piece or finish:
                yield chunk(piece, finish)
            if finish:
                if include_usage:
                    yield "data: " + json.dumps({**head, "choices": [], "usage": usage()}) + "\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if not seq.finished:
            scheduler.cancel(seq)
