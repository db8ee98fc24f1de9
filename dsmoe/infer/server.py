"""An OpenAI-compatible server on FastAPI, with a web page at `/`.

    POST /v1/completions        prompt (a string, strings, token ids, lists of token ids), max_tokens, n,
                                temperature, top_p, top_k, repetition_penalty, presence_penalty,
                                frequency_penalty, logit_bias, stop, seed, logprobs (top-N), echo, stream
                                (server-sent events ending in `data: [DONE]`), stream_options.include_usage
    POST /v1/chat/completions   messages through the chat template (dsmoe.infer.chat), the same settings;
                                logprobs + top_logprobs, max_tokens or max_completion_tokens
    GET  /v1/models             the one model served
    GET  /health                status, running / waiting requests, slots, peak batch, finished requests
    GET  /                      a page to try prompts: settings, streamed output, tokens/s

Every request is decoded by one Scheduler together with the others in flight. Its settings are checked
on arrival (dsmoe.infer.sampling.SamplingParams); a bad one gets a 4xx in OpenAI's shape, `{"error":
{"message", "type", "param", "code"}}`, `param` naming the field, as does every other error (unknown
route, unparsable body, a field this server does not support). A request that fails while decoding fails
alone; a client that disconnects has its request dropped and its rows freed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dsmoe.infer.chat import chat_template, render_chat
from dsmoe.infer.engine import Batch, Sequence, context_error
from dsmoe.infer.openai_api import (ChatRequest, CompletionRequest, chat_logprobs, completion_logprobs, error,
                                    http_error, server_error, validation_error)
from dsmoe.infer.sampling import SamplingParams
from dsmoe.infer.seeds import prompt_seed
from dsmoe.infer.scheduler import QueueFull, Scheduler

PAGE = Path(__file__).with_name("static") / "index.html"
POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
FAILED = "decoding failed for this request; the server log has the traceback"


class BadRequest(ValueError):
    def __init__(self, message: str, param: Optional[str]):
        super().__init__(message)
        self.param = param


def _param_of(message: str, default: str) -> str:
    """The field a ValueError of SamplingParams or Batch names ("top_k=...: must be ...")."""
    m = re.match(r"^(\w+)[=:]", message)
    return m.group(1) if m else default


def create_app(batch: Batch, model_name: str, max_waiting: int = 256) -> FastAPI:
    """The app serving `batch`'s model (its tokenizer is needed) under the id `model_name`."""
    if batch.tokenizer is None:
        raise ValueError("the server needs the model's tokenizer: build the Batch with tokenizer=")
    scheduler = Scheduler(batch, max_waiting)
    tok, context, created = batch.tokenizer, batch.cache.capacity, int(time.time())
    template = chat_template(tok)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="dsmoe", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
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

    def encode(text: str, param: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequest(f"{param}: not valid Unicode ({e.reason} at character {e.start}): send UTF-8 text",
                             param) from None
        return tok.encode(text) or [tok.eot_id]

    def prompts_of(req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            return [encode(p, "prompt")]
        if not p:
            raise BadRequest("prompt: an empty list; give a string, strings, token ids or lists of token ids", "prompt")
        if isinstance(p[0], str):
            return [encode(s, "prompt") for s in p]
        lists = [p] if isinstance(p[0], int) else p
        for ids in lists:
            if not ids or any(not 0 <= t < tok.vocab_size for t in ids):
                raise BadRequest(f"prompt: token ids must be non-empty lists of ids in [0, {tok.vocab_size})", "prompt")
        return [list(ids) for ids in lists]

    def sampling(req, max_tokens: int, logprobs: Optional[int], prompt_logprobs: bool) -> SamplingParams:
        if req.logit_bias and not all(k.isdigit() for k in req.logit_bias):
            raise BadRequest("logit_bias: keys must be token ids (strings of digits)", "logit_bias")
        try:
            return SamplingParams(
                max_new_tokens=max_tokens, temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
                repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                logit_bias=tuple((int(k), v) for k, v in (req.logit_bias or {}).items()),
                stop=tuple([req.stop] if isinstance(req.stop, str) else req.stop or ()), seed=req.seed,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except ValueError as e:  # the message starts with the field's name
            raise BadRequest(str(e), _param_of(str(e), "body")) from None

    def start(prompts: list[list[int]], params: SamplingParams, n: int, events: asyncio.Queue) -> list[Sequence]:
        """Queue n sequences per prompt; raises BadRequest or QueueFull. Sequence k (prompt i's choice j,
        k = i * n + j) draws from prompt_seed(seed, k): the rule launch/generate.py follows (dsmoe.infer.seeds)."""
        for ids in prompts:
            problem = context_error(len(ids), params.max_new_tokens, context)
            if problem:
                raise BadRequest(problem, "prompt" if len(ids) >= context else "max_tokens")
        loop = asyncio.get_running_loop()
        seqs = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                index = i * n + j
                try:
                    p = params if params.seed is None else dataclasses.replace(params, seed=prompt_seed(params.seed, index))
                    seqs.append(batch.new_sequence(ids, p, lambda s, piece, index=index: loop.call_soon_threadsafe(
                        events.put_nowait, (index, piece, s.finish_reason))))
                except ValueError as e:
                    raise BadRequest(str(e), _param_of(str(e), "prompt")) from None
        try:
            for s in seqs:
                scheduler.submit(s)
        except QueueFull:
            for s in seqs:
                scheduler.cancel(s)
            raise
        return seqs

    async def run(request: Request, req, prompts, params, n, body, chunk, chunk_object: str):
        """The whole response (`body(seqs)`), or server-sent events: `chunk(seq, index, piece, finish)`'s
        choices under `chunk_object`."""
        events: asyncio.Queue = asyncio.Queue()
        try:
            seqs = start(prompts, params, n, events)
        except BadRequest as e:
            return error(400, str(e), e.param)
        except QueueFull as e:
            return error(503, str(e), None, "server_busy")
        head = {"id": f"{'chatcmpl' if isinstance(req, ChatRequest) else 'cmpl'}-{secrets.token_hex(12)}",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(scheduler, seqs, n, events, {**head, "object": chunk_object}, chunk,
                                         include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        while not all(s.finished for s in seqs):
            try:
                await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    for s in seqs:
                        scheduler.cancel(s)
                    return error(499, "the client closed the request", None)
        if any(s.finish_reason == "error" for s in seqs):
            return error(500, FAILED, None)
        return {**head, **body(seqs), "usage": usage(seqs, n)}

    def refused(e: BadRequest):
        unknown_model = e.param == "model"
        return error(404 if unknown_model else 400, str(e), e.param, code="model_not_found" if unknown_model else None)

    def check_model(name: Optional[str]) -> None:
        if name not in (None, model_name):
            raise BadRequest(f"model '{name}' is not served here; this server serves '{model_name}'", "model")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        try:
            check_model(req.model)
            if req.best_of not in (None, req.n):
                raise BadRequest(f"best_of={req.best_of}: only best_of = n ({req.n}) is served (no ranking of "
                                 f"candidates); leave it out", "best_of")
            prompts = prompts_of(req)
            params = sampling(req, req.max_tokens, req.logprobs, req.echo and req.logprobs is not None)
        except BadRequest as e:
            return refused(e)
        echo = [tok.decode(ids) if req.echo else "" for ids in prompts for _ in range(req.n)]

        def choice(seq: Sequence, index: int) -> dict:
            lp = completion_logprobs(tok, seq, req.echo, offset=0 if req.echo else len(tok.decode(seq.prompt))) \
                if req.logprobs is not None else None
            return {"index": index, "text": echo[index] + seq.text, "logprobs": lp, "finish_reason": seq.finish_reason}

        def body(seqs):
            return {"object": "text_completion", "choices": [choice(s, i) for i, s in enumerate(seqs)]}

        sent: dict[int, int] = {}  # per choice streamed so far: output tokens with their logprobs

        def chunk(seq: Sequence, index: int, piece: str, finish: Optional[str]) -> dict:
            first, end = index not in sent, len(seq.top_logprobs)  # top_logprobs grows last: all three reach end
            lp = completion_logprobs(tok, seq, req.echo and first, sent.get(index, 0), end) \
                if req.logprobs is not None else None
            sent[index] = end
            return {"choices": [{"index": index, "text": (echo[index] if first else "") + piece, "logprobs": lp,
                                 "finish_reason": finish}]}

        return await run(request, req, prompts, params, req.n, body, chunk, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        try:
            check_model(req.model)
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            for i, m in enumerate(messages):
                encode(m["content"], f"messages.{i}.content")
            ids = encode(render_chat(messages, template), "messages")
            max_tokens = req.max_completion_tokens or req.max_tokens or context - len(ids)
            if req.top_logprobs is not None and not req.logprobs:
                raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
            top = req.top_logprobs if req.top_logprobs is not None else 0
            params = sampling(req, max(max_tokens, 1), top if req.logprobs else None, False)
        except BadRequest as e:
            return refused(e)

        def body(seqs):
            return {"object": "chat.completion", "choices": [
                {"index": i, "message": {"role": "assistant", "content": s.text},
                 "logprobs": chat_logprobs(tok, s) if req.logprobs else None, "finish_reason": s.finish_reason}
                for i, s in enumerate(seqs)]}

        sent: dict[int, int] = {}

        def chunk(seq: Sequence, index: int, piece: str, finish: Optional[str]) -> dict:
            first, end = index not in sent, len(seq.top_logprobs)
            lp = chat_logprobs(tok, seq, sent.get(index, 0), end) if req.logprobs else None
            sent[index] = end
            delta = ({"role": "assistant", "content": piece} if first else {"content": piece}) if piece or first else {}
            return {"choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        return await run(request, req, [ids], params, req.n, body, chunk, "chat.completion.chunk")

    return app


def usage(seqs: list[Sequence], n: int) -> dict:
    """Token counts of a request whose `seqs` are n completions per prompt (each prompt counted once)."""
    prompt = sum(len(s.prompt) for s in seqs[::n])
    completion = sum(len(s.out) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def sse(scheduler: Scheduler, seqs: list[Sequence], n: int, events: asyncio.Queue, head: dict, chunk,
              include_usage: bool):
    """Server-sent events: a chunk per piece of text of each choice, one with its finish reason, [DONE].
    Leaving early (the client disconnected: the response task is cancelled) drops the requests from the
    batch."""
    try:
        left = len(seqs)
        while left:
            index, piece, finish = await events.get()
            if finish == "error":
                yield "data: " + json.dumps({"error": {"message": FAILED, "type": "server_error", "param": None,
                                                       "code": None}}) + "\n\n"
                break
            if piece or finish:
                yield "data: " + json.dumps({**head, **chunk(seqs[index], index, piece, finish)}) + "\n\n"
            left -= bool(finish)
        else:
            if include_usage:
                yield "data: " + json.dumps({**head, "choices": [], "usage": usage(seqs, n)}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for s in seqs:
            if not s.finished:
                scheduler.cancel(s)
