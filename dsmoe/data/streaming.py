"""Batches from a Hugging Face dataset read, tokenized and packed on the fly; resumable at any world size.

The corpus is split into S disjoint streams (`StreamSource`, S fixed at the run's start). Stream s reads
its rows in blocks of `shuffle_buffer` rows; block b of epoch e is permuted by a generator seeded with
(seed, s, e, b) (the shuffle buffer); its documents are tokenized in background processes
(`EncodePool`), each followed by end-of-text, and concatenated; the stream is cut into windows of
seq_len + 1 tokens at stride seq_len (a window's last token is the next window's first, as in
`TokenBatches`). When a stream's rows run out it starts its next epoch.

Rank r of W owns the streams s with s % W == r and takes every window from its stream with the fewest
windows so far (the lowest index on ties). With no empty stream, world 1 takes window j from stream
j % S, and when W divides S rank r's i-th window is world 1's window r + i * W: the ranks together
read exactly the world-1 stream, and a global batch of W x micro_batch windows holds the same windows
at every such world size.

A stream's position is (epoch, block, `datasets`' state at the block's first row, document index in
the permuted block, token offset in that document, windows taken): integers and `datasets`' own
dictionary of integers, so `torch.load(weights_only=True)` reads it. The read-ahead block and the
documents still in flight are not saved: a resume re-reads the current block from its start state,
permutes it again and skips the documents and tokens already used, so it continues with exactly the
next token of every stream. Resuming at another world size W' reassigns whole streams: no token is
skipped or repeated, at any W' <= S (when W' does not divide S, ranks own unequal numbers of streams
and read them at unequal rates); W' > S is refused.

Why our own shuffle buffer: `datasets`' `IterableDataset.shuffle` loses the buffered rows on resume
(its state_dict documentation says so); its `state_dict` is used for the row position, which is exact.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Any, Mapping

import numpy as np
import torch

from dsmoe.data.encode_pool import EncodePool, encode_documents
from dsmoe.data.sources import DataError, HfDataFiles
from dsmoe.data.stream_source import EmptyStream, StreamSource

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
STATE_FORMAT = 1
CHUNK_DOCS = 32  # documents per tokenization task: large enough to amortise the inter-process hop
READ_AHEAD_BLOCKS = 1  # blocks read and sent to the workers beyond the one being consumed


class _Block:
    """One permuted block of a stream: its documents' tokens, from document `first` on."""

    def __init__(self, epoch: int, number: int, start: dict | None, n_docs: int, first: int,
                 chunks: list[Future]) -> None:
        self.epoch, self.number, self.start = epoch, number, start
        self.n_docs, self.first = n_docs, first
        self._chunks: list[Any] = chunks

    def tokens(self, doc: int) -> np.ndarray:
        chunk, i = divmod(doc - self.first, CHUNK_DOCS)
        if isinstance(self._chunks[chunk], Future):
            self._chunks[chunk] = EncodePool.result(self._chunks[chunk])
        return self._chunks[chunk][i]

    def release_before(self, doc: int) -> None:
        """Drop the tokens of chunks wholly before `doc`."""
        chunk = (doc - self.first) // CHUNK_DOCS
        if chunk > 0 and self._chunks[chunk - 1] is not None:
            self._chunks[chunk - 1] = None


class _DocStream:
    """One stream's position and read-ahead (see the module docstring)."""

    def __init__(self, index: int, source: StreamSource, pool: EncodePool, *, seed: int, block_rows: int,
                 skip_rows: int) -> None:
        self.index, self.source, self.pool = index, source, pool
        self.seed, self.block_rows, self.skip_rows = seed, block_rows, skip_rows
        self._reader = None
        self.load({"epoch": 0, "block": 0, "start": None, "doc": 0, "offset": 0, "windows": 0})

    def load(self, position: Mapping[str, Any]) -> None:
        self.close()
        self.epoch, self.block, self.start = int(position["epoch"]), int(position["block"]), position["start"]
        self.doc, self.offset, self.windows = int(position["doc"]), int(position["offset"]), int(position["windows"])
        self._blocks: deque[_Block] = deque()
        self._next_read = (self.epoch, self.block, self.start)
        self._epoch_docs: int | None = None  # documents read in the epoch being read, when read from its start

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None

    def position(self) -> dict:
        return {"epoch": self.epoch, "block": self.block, "start": self.start, "doc": self.doc,
                "offset": self.offset, "windows": self.windows}

    def window(self, seq_len: int) -> np.ndarray:
        """The next seq_len + 1 tokens; the position moves seq_len tokens on."""
        parts = self._take(seq_len)
        block = self._current()
        parts.append(block.tokens(self.doc)[self.offset:self.offset + 1])
        self.windows += 1
        return np.concatenate(parts)

    def _take(self, n: int) -> list[np.ndarray]:
        parts = []
        while n:
            block = self._current()
            tokens = block.tokens(self.doc)
            part = tokens[self.offset:self.offset + n]
            if not len(part):  # a position saved over other files: never spin on it
                raise DataError(f"{self.source.describe(self.index)}: the position (document {self.doc} of block "
                                 f"{self.block}, token {self.offset}) is past that document's end ({len(tokens)} "
                                 f"tokens): the files changed since the position was saved. Restore them, or start "
                                 f"the data stream afresh in a new run.dir")
            parts.append(part)
            n -= len(part)
            self.offset += len(part)
            if self.offset == len(tokens):
                self.doc, self.offset = self.doc + 1, 0
                block.release_before(self.doc)
        return parts

    def _current(self) -> _Block:
        """The block holding the position, with READ_AHEAD_BLOCKS more read and in the workers."""
        while True:
            while len(self._blocks) < 1 + READ_AHEAD_BLOCKS:
                self._read_block()
            head = self._blocks[0]
            if self.doc < head.n_docs:
                return head
            self._blocks.popleft()
            if not self._blocks:
                self._read_block()
            head = self._blocks[0]
            self.epoch, self.block, self.start, self.doc, self.offset = head.epoch, head.number, head.start, 0, 0

    def _read_block(self) -> None:
        epoch, number, start = self._next_read
        if self._reader is None:
            self._reader = self.source.reader(self.index, start, self.skip_rows)
            self._epoch_docs = 0 if start is None else None
        docs, ended = self._reader.read(self.block_rows)
        order = np.random.default_rng((self.seed, self.index, epoch, number)).permutation(len(docs))
        resuming = not self._blocks and (epoch, number) == (self.epoch, self.block)
        first = min(self.doc, len(docs)) if resuming else 0
        texts = [docs[i] for i in order[first:]]
        chunks = [self.pool.submit(texts[i:i + CHUNK_DOCS]) for i in range(0, len(texts), CHUNK_DOCS)]
        self._blocks.append(_Block(epoch, number, start, len(docs), first, chunks))
        if self._epoch_docs is not None:
            self._epoch_docs += len(docs)
        if not ended:
            self._next_read = (epoch, number + 1, self._reader.state())
            return
        if self._epoch_docs == 0:
            held_out = f" after the {self.skip_rows} rows held out for validation" if self.skip_rows else ""
            raise EmptyStream(f"{self.source.describe(self.index)} holds no document{held_out}")
        self._next_read = (epoch + 1, 0, None)
        self.close()


class StreamingBatches:
    """This rank's (x, y) batches, int64 [micro_batch, seq_len] with y the next token of x, read from
    `source` as the module docstring describes.

    Args:
        source, data_files, hf_config, split, text_field, hf_options: the dataset (see StreamSource).
        tokenizer: a tokenizer name (`byte`, `tiktoken:gpt2`); workers build their own copy.
        streams: streams the corpus is split into (None: one per shard, at least `world`, at most 64).
        shuffle_buffer: rows per shuffled block (1 = the dataset's order).
        workers: tokenizer processes (0 = tokenize in this process).
        val_documents: documents for validation_tokens(); with `val_split` None they are the first rows of
            stream 0, which training skips in every epoch (0 = none held out).
        val_split: a split to validate on instead (e.g. 'validation'); nothing is held out of training.

    Iterate it for batches; state_dict() after any batch, merged over ranks with merge_stream_states,
    resumes every rank at its next token (load_state_dict). Close it (or use `with`) to stop the workers.
    """

    def __init__(self, source: str, tokenizer: str, seq_len: int, micro_batch: int, *, rank: int = 0,
                 world: int = 1, seed: int = 0, data_files: HfDataFiles | None = None, hf_config: str | None = None,
                 split: str = "train", text_field: str = "text", hf_options: Mapping[str, Any] | None = None,
                 streams: int | None = None, shuffle_buffer: int = 1024, workers: int = 1,
                 val_documents: int = 1000, val_split: str | None = None) -> None:
        if seq_len < 1 or micro_batch < 1 or shuffle_buffer < 1 or val_documents < 0:
            raise ValueError(f"seq_len ({seq_len}), micro_batch ({micro_batch}) and shuffle_buffer "
                             f"({shuffle_buffer}) must be positive, val_documents ({val_documents}) >= 0")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        self.seq_len, self.micro_batch, self.rank, self.world = seq_len, micro_batch, rank, world
        self.val_documents, self.val_split = val_documents, val_split
        self._streams_pinned = streams is not None
        self.source = StreamSource(source, data_files=data_files, hf_config=hf_config, split=split,
                                   text_field=text_field, hf_options=hf_options, world=world, num_streams=streams)
        self.fixed = {"source": source, "data_files": data_files, "hf_config": hf_config, "split": split,
                      "text_field": text_field, "tokenizer": tokenizer, "seed": seed,
                      "shuffle_buffer": shuffle_buffer, "held_out": 0 if val_split else val_documents,
                      "streams": self.source.num_streams}
        self.pool = EncodePool(tokenizer, workers)
        self.empty_streams: list[int] = []
        self._streams: list[_DocStream] = []
        # Close the open shards and workers at exit if the owner does not: before interpreter shutdown,
        # while the readers' modules still exist (the list is refilled in place by _build_streams).
        self._finalizer = weakref.finalize(self, _close, self._streams, self.pool)
        self._build_streams()

    @property
    def num_streams(self) -> int:
        return self.source.num_streams

    def _build_streams(self) -> None:
        S, f = self.source.num_streams, self.fixed
        if S < self.world:
            raise ValueError(f"this data stream is split into {S} streams, fewer than the {self.world} ranks: "
                             f"every rank needs one. Resume on at most {S} ranks, or start the data afresh "
                             f"with data.streams >= {self.world}")
        if S % self.world:
            warnings.warn(f"{S} streams over {self.world} ranks: ranks own unequal numbers of streams and read "
                          f"them at unequal rates (no document is skipped or repeated)", stacklevel=3)
        for stream in self._streams:
            stream.close()
        self._streams[:] = [_DocStream(s, self.source, self.pool, seed=f["seed"], block_rows=f["shuffle_buffer"],
                                       skip_rows=f["held_out"] if s == 0 else 0)
                            for s in range(self.rank, S, self.world)]
        self._live = list(self._streams)

    def __iter__(self) -> "StreamingBatches":
        return self

    def __next__(self) -> Batch:
        rows = torch.from_numpy(np.stack([self._next_window() for _ in range(self.micro_batch)]).astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _next_window(self) -> np.ndarray:
        while self._live:
            stream = min(self._live, key=lambda s: (s.windows, s.index))
            try:
                return stream.window(self.seq_len)
            except EmptyStream as e:
                log.warning("%s; it is skipped", e)
                self._live.remove(stream)
                self.empty_streams.append(stream.index)
        raise ValueError(f"rank {self.rank}: none of its streams ({[s.index for s in self._streams]} of "
                         f"{self.num_streams}) holds a document; check data_files and data.text_field")

    @property
    def samples(self) -> int:
        """Windows this rank has taken (over the run, restored by load_state_dict)."""
        return sum(s.windows for s in self._streams)

    def stats(self) -> dict:
        """Counted skips: rows with empty or non-text documents, files without rows, empty streams."""
        return {"skipped_empty_rows": self.source.counts["empty"], "skipped_not_text_rows": self.source.counts["not_text"],
                "skipped_files": list(self.source.skipped_files), "empty_streams": list(self.empty_streams)}

    def state_dict(self) -> dict:
        """This rank's streams' positions (after the last batch yielded); merge every rank's with
        merge_stream_states before saving, so any world size can resume."""
        streams = {s.index: s.position() for s in self._streams}
        return {"format": STATE_FORMAT, "fixed": dict(self.fixed), "streams": streams,
                "samples": sum(p["windows"] for p in streams.values())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved state (this rank's own, or every rank's merged). Refuses, naming the
        field, a state made with another dataset, tokenizer, seed, shuffle buffer or hold-out, with a
        stream count this world cannot take, or missing one of this rank's streams."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a streaming data state (format {state.get('format')!r}, expected {STATE_FORMAT})")
        saved = state["fixed"]
        changed = [f"{key} {saved.get(key)!r} -> {value!r}" for key, value in self.fixed.items()
                   if saved.get(key) != value and not (key == "streams" and not self._streams_pinned)]
        if changed:
            raise ValueError(f"the saved data stream was read with other settings ({'; '.join(changed)}), so its "
                             f"position means nothing here. Resume with the saved settings, or start the data "
                             f"stream afresh (a new run directory)")
        if saved["streams"] != self.num_streams:
            self.source.set_num_streams(saved["streams"])
            self.fixed["streams"] = saved["streams"]
            self._build_streams()
        missing = [s.index for s in self._streams if s.index not in state["streams"]]
        if missing:
            raise ValueError(f"the saved state has no position for streams {missing} (it holds "
                             f"{sorted(state['streams'])}); save merge_stream_states() of every rank's state_dict()")
        for stream in self._streams:
            stream.load(state["streams"][stream.index])
        self._live, self.empty_streams = list(self._streams), []

    def validation_tokens(self) -> np.ndarray:
        """The validation documents (see val_documents / val_split), tokenized with end-of-text after each:
        int32 [tokens], the same on every rank. Pass them to dsmoe.data.val_batches."""
        if not self.val_documents:
            raise ValueError("no validation documents: set val_documents > 0")
        docs = self.source.validation_documents(self.val_documents, self.val_split)
        if not docs:
            raise ValueError(f"the validation source ({self.val_split or 'the first rows of stream 0'}) holds "
                             f"no document")
        return np.concatenate(encode_documents(docs, self.pool.tokenizer))

    def close(self) -> None:
        """Stop the tokenizer workers and close the open shards."""
        self._finalizer()

    def __enter__(self) -> "StreamingBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close(streams: list[_DocStream], pool: EncodePool) -> None:
    for stream in streams:
        stream.close()
    pool.close()


def merge_stream_states(states: list[Mapping[str, Any]]) -> dict:
    """One state holding every stream's position, from each rank's state_dict() (any order).

    Raises:
        ValueError: states made with different settings, a stream claimed twice, or a stream missing.
    """
    if not states:
        raise ValueError("no states to merge")
    fixed, streams = states[0]["fixed"], {}
    for state in states:
        if state["fixed"] != fixed:
            raise ValueError(f"the ranks' data states differ in their settings: {state['fixed']} vs {fixed}")
        for index, position in state["streams"].items():
            if index in streams:
                raise ValueError(f"stream {index} is in two ranks' states")
            streams[index] = position
    missing = sorted(set(range(fixed["streams"])) - set(streams))
    if missing:
        raise ValueError(f"streams {missing} are in no rank's state; merge the state_dict() of every rank")
    return {"format": STATE_FORMAT, "fixed": dict(fixed), "streams": dict(sorted(streams.items())),
            "samples": sum(p["windows"] for p in streams.values())}
