"""Generation: prefill each prompt into a KV cache, then decode all live sequences one token per step.

`Batch` holds up to `max_batch` sequences in one cache, rows 0..n-1 (a finished sequence's row is
filled by the last live one, so the live rows stay one contiguous slice). New sequences may join
between decode steps (`add`): their prompts are prefilled together, right-padded, into the next free
rows, each row at its own positions (see dsmoe.infer.forward). `generate` runs a batch of prompts to
the end; the server's scheduler drives a `Batch` itself.

Routing at inference is training's (the trained aux-loss-free bias chooses the experts), and capacity
limits never drop a token at inference (dsmoe.infer.forward.dropless).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence as Seq, Union

import torch

from dsmoe.data.tokenizer import Tokenizer
from dsmoe.infer.cache import KVCache
from dsmoe.infer.forward import forward_cached
from dsmoe.infer.sampling import SamplingParams, sample
from dsmoe.infer.text import TextStream
from dsmoe.model import Transformer


@dataclass(eq=False)
class Sequence:
    """One prompt being continued. `listener(seq, piece)` is called from the decoding thread with each
    new piece of final text (streaming), and once more with "" when the sequence finishes."""
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    listener: Optional[Callable[["Sequence", str], None]] = None
    out: list[int] = field(default_factory=list)  # generated ids (an end-of-text token is not kept)
    text: str = ""  # final output text so far
    finish_reason: Optional[str] = None  # "stop" (end-of-text or a stop string), "length", "cancelled", "error"
    seen: Optional[torch.Tensor] = None  # [vocab] bool: ids in prompt + output (repetition penalty only)
    stream: Optional[TextStream] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def context_error(n_prompt: int, max_new_tokens: int, context: int) -> Optional[str]:
    """Why a prompt of `n_prompt` tokens plus `max_new_tokens` cannot run in `context` tokens, or None."""
    if n_prompt < 1:
        return "the prompt is empty: give at least one token"
    if n_prompt + max_new_tokens > context:
        return (f"the prompt is {n_prompt} tokens and {max_new_tokens} new tokens were asked for: together "
                f"{n_prompt + max_new_tokens}, more than the model's context of {context} tokens; "
                f"shorten the prompt or ask for at most {max(context - n_prompt, 0)} new tokens")
    return None


class Batch:
    """Live sequences sharing one KV cache of `max_batch` rows x `capacity` tokens (default: the model's
    max_seq_len). `tokenizer` is needed for text and stop strings; `eos_id` (default the tokenizer's
    end-of-text) ends a sequence unless its params say ignore_eos; ids >= `vocab_limit` (default the
    tokenizer's vocabulary, else the model's) are never sampled."""

    def __init__(self, model: Transformer, max_batch: int, capacity: Optional[int] = None,
                 tokenizer: Optional[Tokenizer] = None, eos_id: Optional[int] = None,
                 vocab_limit: Optional[int] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        param = next(model.parameters())
        self.device = param.device
        dtype = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else param.dtype
        self.cache = KVCache.allocate(model.cfg, max_batch, capacity or model.cfg.model.max_seq_len, dtype, self.device)
        self.eos_id = eos_id if eos_id is not None else (tokenizer.eot_id if tokenizer else None)
        self.vocab_limit = vocab_limit or (tokenizer.vocab_size if tokenizer else model.vocab_size)
        self.rows: list[Sequence] = []

    @property
    def free(self) -> int:
        return self.cache.batch - len(self.rows)

    def new_sequence(self, prompt: list[int], params: SamplingParams,
                     listener: Optional[Callable[[Sequence, str], None]] = None) -> Sequence:
        """A sequence for this batch; raises ValueError when it cannot fit the cache or needs a tokenizer."""
        problem = context_error(len(prompt), params.max_new_tokens, self.cache.capacity)
        if problem:
            raise ValueError(problem)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass tokenizer= to compare text")
        if any(not 0 <= t < self.model.vocab_size for t in prompt):
            raise ValueError(f"prompt ids must lie in [0, {self.model.vocab_size})")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(list(prompt), params, torch.Generator(self.device).manual_seed(seed), listener)
        if self.tokenizer is not None:
            seq.stream = TextStream(self.tokenizer, params.stop)
        if params.repetition_penalty != 1:
            seq.seen = torch.zeros(self.vocab_limit, dtype=torch.bool, device=self.device)
            seq.seen[torch.tensor([t for t in prompt if t < self.vocab_limit], dtype=torch.long,
                                  device=self.device)] = True
        return seq

    def add(self, seqs: Seq[Sequence]) -> None:
        """Prefill `seqs` into the next free rows and sample each one's first token."""
        if len(seqs) > self.free:
            raise ValueError(f"{len(seqs)} sequences for {self.free} free rows")
        if not seqs:
            return
        n, lengths = len(self.rows), [len(s.prompt) for s in seqs]
        tokens = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, :lengths[i]] = torch.tensor(s.prompt)
        rows = self.cache.rows(n, n + len(seqs))
        rows.lengths.zero_()
        logits_BSV = forward_cached(self.model, tokens.to(self.device), rows, lengths)
        last = torch.tensor(lengths, device=self.device) - 1
        self.rows.extend(seqs)
        self._advance(seqs, logits_BSV[torch.arange(len(seqs), device=self.device), last])

    def step(self) -> None:
        """Decode one token for every live row."""
        if not self.rows:
            return
        tokens = torch.tensor([[s.out[-1]] for s in self.rows], device=self.device)
        logits_BSV = forward_cached(self.model, tokens, self.cache.rows(0, len(self.rows)))
        self._advance(list(self.rows), logits_BSV[:, -1])

    def remove(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Take `seq` out (its row is refilled by the last live one) and finish it with `reason`."""
        i = self.rows.index(seq)
        last = len(self.rows) - 1
        if i != last:
            self.cache.move_row(last, i)
            self.rows[i] = self.rows[last]
        self.rows.pop()
        if not seq.finished:
            self.finish(seq, reason)

    def _advance(self, seqs: list[Sequence], logits_BV: torch.Tensor) -> None:
        seen = torch.stack([s.seen if s.seen is not None else torch.zeros(self.vocab_limit, dtype=torch.bool,
                                                                          device=self.device) for s in seqs]) \
            if any(s.seen is not None for s in seqs) else None
        tokens = sample(logits_BV[:, :self.vocab_limit], [s.params for s in seqs], [s.generator for s in seqs], seen)
        for s, t in zip(seqs, tokens):
            if t == self.eos_id and not s.params.ignore_eos:
                self.finish(s, "stop", flush=True)
                continue
            s.out.append(t)
            if s.seen is not None:
                s.seen[t] = True
            full = len(s.out) >= s.params.max_new_tokens
            if s.stream is not None:
                piece, stopped = s.stream.update(s.out, final=full)
                self._emit(s, piece)
                if stopped:
                    self.finish(s, "stop")
                    continue
            if full:
                self.finish(s, "length", flush=True)
        for s in seqs:
            if s.finished:
                self.remove(s)

    def _emit(self, seq: Sequence, piece: str) -> None:
        if piece:
            seq.text += piece
            if seq.listener is not None:
                seq.listener(seq, piece)

    def finish(self, seq: Sequence, reason: str, flush: bool = False) -> None:
        """End `seq` with `reason` and tell its listener; `flush` hands out the text held back."""
        if flush and seq.stream is not None:  # what was held back is final now
            self._emit(seq, seq.stream.update(seq.out, final=True)[0])
        seq.finish_reason = reason
        if seq.listener is not None:
            seq.listener(seq, "")


Prompt = Union[str, Seq[int]]


def generate(model: Transformer, prompts: Seq[Prompt], params: Union[SamplingParams, Seq[SamplingParams]] = SamplingParams(),
             tokenizer: Optional[Tokenizer] = None,
             on_text: Optional[Callable[[int, str], None]] = None) -> list[Sequence]:
    """Complete `prompts` (strings need `tokenizer`; an empty string starts from end-of-text) together in
    one batch; returns their finished Sequences (`.text`, `.out`, `.finish_reason`) in order.
    `on_text(i, piece)` streams prompt i's text as it becomes final. Raises ValueError for a prompt that
    does not fit the context with its max_new_tokens, or bad settings (named)."""
    if not prompts:
        raise ValueError("no prompts given")
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
    ids = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass tokenizer= or give token ids")
            p = tokenizer.encode(p) or [tokenizer.eot_id]
        ids.append(list(p))
    capacity = min(model.cfg.model.max_seq_len, max(len(i) + p.max_new_tokens for i, p in zip(ids, params)))
    batch = Batch(model, len(prompts), capacity, tokenizer)

    def listener(i: int):
        return None if on_text is None else (lambda seq, piece: piece and on_text(i, piece))

    seqs = [batch.new_sequence(p_ids, p, listener(i)) for i, (p_ids, p) in enumerate(zip(ids, params))]
    batch.add(seqs)
    while batch.rows:
        batch.step()
    return seqs


def generate_ids(model: Transformer, idx_BS: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, generator: Optional[torch.Generator] = None,
                 vocab_limit: Optional[int] = None) -> torch.Tensor:
    """`idx_BS` [B, S] followed by exactly `max_new_tokens` sampled ids per row: [B, S + max_new_tokens].

    Every row draws from `generator` (default: a fresh seed); no end-of-text stop, so every rank of an
    expert-parallel model runs the same number of forwards. Raises ValueError when S + max_new_tokens
    exceeds the model's max_seq_len."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, ignore_eos=True)
    batch = Batch(model, idx_BS.shape[0], idx_BS.shape[1] + max_new_tokens, vocab_limit=vocab_limit)
    seqs = [batch.new_sequence(row, params) for row in idx_BS.tolist()]
    if generator is not None:
        for s in seqs:
            s.generator = generator
    batch.add(seqs)
    while batch.rows:
        batch.step()
    new = torch.tensor([s.out for s in seqs], dtype=idx_BS.dtype, device=idx_BS.device)
    return torch.cat([idx_BS, new], dim=1)
