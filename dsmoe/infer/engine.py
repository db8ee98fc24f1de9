"""Generation: prefill each prompt into a KV cache, then decode all live sequences one token per step.

`Batch` holds up to `max_batch` sequences in one cache, rows 0..n-1 (a finished sequence's row is
filled by the last live one, so the live rows stay one contiguous slice). New sequences may join
between decode steps (`add`): their prompts are prefilled together, right-padded, into the next free
rows, each row at its own positions (see dsmoe.infer.forward), whole or a chunk per step. `generate` runs a batch of prompts to
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
from dsmoe.infer.sampling import SamplingParams, sample, token_logprobs
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
    counts: Optional[torch.Tensor] = None  # [vocab] fp32: times each id was generated (presence/frequency)
    stream: Optional[TextStream] = None
    prefilled: int = 0  # prompt tokens already in the cache
    # params.logprobs: the ids scored (the output, plus an end-of-text that ended it), their log-probabilities
    # and each position's top ones; params.prompt_logprobs: the same for prompt[1:]
    scored: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[dict[int, float]] = field(default_factory=list)

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
    tokenizer's vocabulary, else the model's) are never sampled.

    Rows [0, len(rows)) decode; the rows after them (`prefilling`) hold prompts still being prefilled.
    `prefill_chunk` None prefills a prompt whole in `add`; a number N makes `add` only queue it, and each
    `step` first prefills at most N prompt tokens (one prompt's next N, or several short prompts whole),
    so a long prompt delays the decoding rows by one chunk per step instead of its whole prefill."""

    def __init__(self, model: Transformer, max_batch: int, capacity: Optional[int] = None,
                 tokenizer: Optional[Tokenizer] = None, eos_id: Optional[int] = None,
                 vocab_limit: Optional[int] = None, prefill_chunk: Optional[int] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: must be >= 1 (or None: whole prompts)")
        self.model, self.tokenizer, self.prefill_chunk = model, tokenizer, prefill_chunk
        param = next(model.parameters())
        self.device = param.device
        dtype = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else param.dtype
        self.cache = KVCache.allocate(model.cfg, max_batch, capacity or model.cfg.model.max_seq_len, dtype, self.device)
        self.eos_id = eos_id if eos_id is not None else (tokenizer.eot_id if tokenizer else None)
        self.vocab_limit = vocab_limit or (tokenizer.vocab_size if tokenizer else model.vocab_size)
        self.rows: list[Sequence] = []
        self.prefilling: list[Sequence] = []

    @property
    def free(self) -> int:
        return self.cache.batch - len(self.rows) - len(self.prefilling)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.prefilling)

    def new_sequence(self, prompt: list[int], params: SamplingParams,
                     listener: Optional[Callable[[Sequence, str], None]] = None) -> Sequence:
        """A sequence for this batch; raises ValueError (naming the field) when it cannot fit the cache,
        needs a tokenizer, or asks for ids or a top_k outside the vocabulary."""
        problem = context_error(len(prompt), params.max_new_tokens, self.cache.capacity)
        if problem:
            raise ValueError(problem)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass tokenizer= to compare text")
        if any(not 0 <= t < self.model.vocab_size for t in prompt):
            raise ValueError(f"prompt ids must lie in [0, {self.model.vocab_size})")
        if params.top_k > self.vocab_limit:
            raise ValueError(f"top_k={params.top_k}: must be at most the vocabulary's {self.vocab_limit} ids (0 = off)")
        if any(t >= self.vocab_limit for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias: token ids must lie in [0, {self.vocab_limit})")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = Sequence(list(prompt), params, torch.Generator(self.device).manual_seed(seed), listener)
        if self.tokenizer is not None:
            seq.stream = TextStream(self.tokenizer, params.stop)
        if params.repetition_penalty != 1:
            seq.seen = torch.zeros(self.vocab_limit, dtype=torch.bool, device=self.device)
            seq.seen[torch.tensor([t for t in prompt if t < self.vocab_limit], dtype=torch.long,
                                  device=self.device)] = True
        if params.presence_penalty or params.frequency_penalty:
            seq.counts = torch.zeros(self.vocab_limit, device=self.device)
        return seq

    def add(self, seqs: Seq[Sequence]) -> None:
        """Give `seqs` the next free rows; without a prefill_chunk, prefill them and sample each one's first
        token now."""
        if len(seqs) > self.free:
            raise ValueError(f"{len(seqs)} sequences for {self.free} free rows")
        start = len(self.rows) + len(self.prefilling)
        self.cache.lengths[start:start + len(seqs)] = 0
        self.prefilling.extend(seqs)
        if self.prefill_chunk is None:
            while self.prefilling:
                self.prefill()

    def prefill(self) -> None:
        """Prefill the next chunk of the waiting prompts (rows in order): the first row's next
        prefill_chunk tokens, and the rows after it whole while the chunk has room; a prompt prefilled to
        its end samples its first token and starts decoding."""
        d, budget = len(self.rows), self.prefill_chunk or float("inf")
        take: list[int] = []
        for s in self.prefilling:
            n = min(len(s.prompt) - s.prefilled, budget)
            if take and sum(take) + n > budget:
                break
            take.append(n)
        seqs = self.prefilling[:len(take)]
        tokens = torch.zeros(len(seqs), max(take), dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, take)):
            tokens[i, :n] = torch.tensor(s.prompt[s.prefilled:s.prefilled + n])
        logits_BSV = forward_cached(self.model, tokens.to(self.device), self.cache.rows(d, d + len(seqs)), take)
        for i, (s, n) in enumerate(zip(seqs, take)):
            if s.params.prompt_logprobs:  # position j predicts prompt[prefilled + j + 1]
                nxt = s.prompt[s.prefilled + 1:s.prefilled + n + 1]
                chosen, top = token_logprobs(logits_BSV[i, :len(nxt)], torch.tensor(nxt, device=self.device),
                                             s.params.logprobs or 0, self.vocab_limit)
                s.prompt_logprobs += chosen
                s.prompt_top_logprobs += top
            s.prefilled += n
        # only the last row taken can stop short of its prompt's end (then it was taken alone)
        done = [i for i, s in enumerate(seqs) if s.prefilled == len(s.prompt)]
        if not done:
            return
        del self.prefilling[:len(done)]
        self.rows.extend(seqs[i] for i in done)
        last = torch.tensor([take[i] - 1 for i in done], device=self.device)
        self._advance([seqs[i] for i in done], logits_BSV[torch.tensor(done, device=self.device), last])

    def step(self) -> None:
        """Prefill one chunk of the waiting prompts (with a prefill_chunk), then decode one token for every
        decoding row."""
        if self.prefilling:
            self.prefill()
        if not self.rows:
            return
        tokens = torch.tensor([[s.out[-1]] for s in self.rows], device=self.device)
        logits_BSV = forward_cached(self.model, tokens, self.cache.rows(0, len(self.rows)))
        self._advance(list(self.rows), logits_BSV[:, -1])

    def remove(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Take `seq` out and finish it with `reason` (if it has not finished yet)."""
        self._free_row(seq)
        if not seq.finished:
            self.finish(seq, reason)

    def _free_row(self, seq: Sequence) -> None:
        """Give up `seq`'s row; rows stay contiguous: the last decoding row fills it, and the last
        prefilling row the one freed there."""
        d = len(self.rows)
        if seq in self.prefilling:
            i, last = self.prefilling.index(seq), len(self.prefilling) - 1
            if i != last:
                self.cache.move_row(d + last, d + i)
                self.prefilling[i] = self.prefilling[last]
            self.prefilling.pop()
        else:
            i = self.rows.index(seq)
            if i != d - 1:
                self.cache.move_row(d - 1, i)
                self.rows[i] = self.rows[d - 1]
            self.rows.pop()
            if self.prefilling:  # the first prefilling row is now the last prompt to arrive
                self.cache.move_row(d + len(self.prefilling) - 1, d - 1)
                self.prefilling.insert(0, self.prefilling.pop())

    def _advance(self, seqs: list[Sequence], logits_BV: torch.Tensor) -> None:
        seen = self._stack(seqs, "seen", torch.bool)
        counts = self._stack(seqs, "counts", torch.float32)
        tokens = sample(logits_BV[:, :self.vocab_limit], [s.params for s in seqs], [s.generator for s in seqs], seen, counts)
        scored = [i for i, (s, t) in enumerate(zip(seqs, tokens)) if s.params.logprobs is not None and t is not None]
        if scored:
            idx = torch.tensor(scored, device=self.device)
            chosen, top = token_logprobs(logits_BV[idx], torch.tensor([tokens[i] for i in scored], device=self.device),
                                         max(seqs[i].params.logprobs for i in scored), self.vocab_limit)
            for i, c, t in zip(scored, chosen, top):
                s = seqs[i]
                s.scored.append(tokens[i])
                s.logprobs.append(c)
                s.top_logprobs.append(dict(list(t.items())[:s.params.logprobs]))
        for s, t in zip(seqs, tokens):
            if t is None:  # this row's logits or settings gave no distribution: it fails, the others go on
                self.finish(s, "error")
                continue
            if t == self.eos_id and not s.params.ignore_eos:
                self.finish(s, "stop", flush=True)
                continue
            s.out.append(t)
            if s.seen is not None:
                s.seen[t] = True
            if s.counts is not None:
                s.counts[t] += 1
            full = len(s.out) >= s.params.max_new_tokens
            if s.stream is not None:
                piece, stopped = s.stream.update(s.out, final=full)
                self._emit(s, piece)
                if stopped:
                    self.finish(s, "stop")
                    continue
            if full:
                self.finish(s, "length", flush=True)

    def _stack(self, seqs: list[Sequence], name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """[B, vocab] of each row's `name` tensor (zeros for rows without one), or None when no row has one."""
        if all(getattr(s, name) is None for s in seqs):
            return None
        zeros = torch.zeros(self.vocab_limit, dtype=dtype, device=self.device)
        return torch.stack([getattr(s, name) if getattr(s, name) is not None else zeros for s in seqs])

    def _emit(self, seq: Sequence, piece: str) -> None:
        if piece:
            seq.text += piece
            if seq.listener is not None:
                seq.listener(seq, piece)

    def finish(self, seq: Sequence, reason: str, flush: bool = False) -> None:
        """End `seq` with `reason`, free its row, then tell its listener (so a client told of the end
        finds the row free); `flush` hands out the text held back."""
        if flush and seq.stream is not None:  # what was held back is final now
            self._emit(seq, seq.stream.update(seq.out, final=True)[0])
        if seq in self.rows or seq in self.prefilling:
            self._free_row(seq)
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
    while batch.busy:
        batch.step()
    return seqs


def generate_ids(model: Transformer, idx_BS: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, generator: Optional[torch.Generator] = None,
                 vocab_limit: Optional[int] = None) -> torch.Tensor:
    """`idx_BS` [B, S] followed by exactly `max_new_tokens` sampled ids per row: [B, S + max_new_tokens]
    (temperature 0: greedy). What training's samples run.

    Every row draws from `generator` (default: a fresh seed); no end-of-text stop, so every rank of an
    expert-parallel model runs the same number of forwards. A prompt longer than max_seq_len -
    max_new_tokens is read from its last tokens. `vocab_limit`: the tokenizer's real vocabulary; padding
    ids beyond it are never sampled. Raises ValueError when max_new_tokens >= max_seq_len."""
    room = model.cfg.model.max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"model.max_seq_len={model.cfg.model.max_seq_len}")
    prompt_BS = idx_BS[:, -room:]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, ignore_eos=True)
    batch = Batch(model, prompt_BS.shape[0], prompt_BS.shape[1] + max_new_tokens, vocab_limit=vocab_limit)
    seqs = [batch.new_sequence(row, params) for row in prompt_BS.tolist()]
    if generator is not None:
        for s in seqs:
            s.generator = generator
    batch.add(seqs)
    while batch.busy:
        batch.step()
    new = torch.tensor([s.out for s in seqs], dtype=idx_BS.dtype, device=idx_BS.device)
    return torch.cat([idx_BS, new], dim=1)
