"""A Hugging Face dataset read as a fixed number of disjoint document streams.

`StreamSource("hf:parquet", data_files="shards/*.parquet")`, `StreamSource("hf:json", data_files=...)` or
`StreamSource("hf:HuggingFaceTB/smollm-corpus", hf_config="cosmopedia-v2")` opens the dataset with
`datasets.load_dataset(..., streaming=True)` and splits it into `num_streams` parts that share no
document: by shard (file, or parquet row group after `IterableDataset.reshard`) when the dataset has at
least as many shards as streams (`IterableDataset.shard`), else by example
(`datasets.distributed.split_dataset_by_node(strategy="examples")`: each stream reads everything and
keeps every num_streams-th row). The split depends on the dataset and `num_streams` only, never on
the number of ranks, so a position inside a stream means the same thing at any world size.

A stream's position is `datasets`' own `IterableDataset.state_dict()` (shard index and row offset),
which resumes at exactly the next row. Rows whose text is missing (None or "") or not a string are
skipped and counted; local files with no rows are dropped and counted before loading.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from typing import Any, Mapping

from dsmoe.data.sources import HfDataFiles

log = logging.getLogger(__name__)

# Builders that read local files given by data_files (their globs are resolved here, so empty and
# unreadable files are found before the stream starts and named in the error).
LOCAL_BUILDERS = ("parquet", "json", "csv", "text", "arrow")
# Default stream count cap: each stream keeps its own reader and read-ahead block in memory.
MAX_DEFAULT_STREAMS = 64
_TEXT_TYPES = ("string", "large_string")


class EmptyStream(Exception):
    """A stream read from the start of an epoch to its end held no document."""


class StreamSource:
    """The dataset behind a streaming run, split into `num_streams` disjoint row streams.

    Args:
        source: `hf:BUILDER` (parquet, json, csv, text, arrow: needs `data_files`) or `hf:NAME` (a Hub
            dataset, with `hf_config`).
        data_files: a glob or list of files (local paths are resolved and checked here), or the
            builder's mapping form.
        world: ranks of this run; only used to choose the default stream count.
        num_streams: streams the dataset is split into; None = one per shard, at least `world`, at most
            64 (unless the dataset has fewer shards than `world`).

    Raises:
        ValueError: not an `hf:` source, a glob that matches nothing, an unreadable parquet file, a text
            column that is not text, fewer streams than ranks.
        KeyError: the rows have no `text_field` column.
    """

    def __init__(self, source: str, *, data_files: HfDataFiles | None = None, hf_config: str | None = None,
                 split: str = "train", text_field: str = "text", hf_options: Mapping[str, Any] | None = None,
                 world: int = 1, num_streams: int | None = None) -> None:
        if not source.startswith("hf:") or source == "hf:":
            raise ValueError(f"streaming reads Hugging Face datasets: source must be 'hf:NAME' or 'hf:parquet' / "
                             f"'hf:json' with data_files, got {source!r}; prepare other sources instead")
        self.source, self.name = source, source.removeprefix("hf:")
        self.hf_config, self.split, self.text_field = hf_config, split, text_field
        self.hf_options = dict(hf_options or {})
        self.skipped_files: list[str] = []
        self.counts: Counter = Counter()  # skipped rows: "empty" (None or ""), "not_text"
        self.files = self._local_files(data_files) if self.name in LOCAL_BUILDERS else None
        self.data_files = self.files if self.files is not None else data_files
        self.dataset = self._load(split)
        self._check_text_column(self.dataset)
        self.dataset = self.dataset.select_columns([text_field])
        shards = self.dataset.num_shards
        self.set_num_streams(num_streams or max(world, min(shards, MAX_DEFAULT_STREAMS)))
        if self.num_streams < world:
            raise ValueError(f"{self.num_streams} streams for {world} ranks: every rank needs at least one "
                             f"stream; raise the stream count (data.streams) or leave it null")

    def _load(self, split: str):
        try:
            import datasets
        except ImportError as e:
            raise ImportError("'hf:' streaming sources need the datasets package: pip install datasets") from e
        return datasets.load_dataset(self.name, self.hf_config, split=split, streaming=True,
                                     data_files=self.data_files, **self.hf_options)

    def _local_files(self, data_files: HfDataFiles | None) -> list[str] | None:
        """Resolve local globs in sorted order; drop files without rows (counted), refuse unreadable
        parquet files. Remote patterns (hf://, s3://, ...) and mappings go to datasets unchanged."""
        if data_files is None:
            raise ValueError(f"source {self.source!r} reads files: set data_files (data.hf_data_files) to a glob "
                             f"such as 'corpus/train-*.parquet'")
        if isinstance(data_files, Mapping):
            return None
        patterns = [data_files] if isinstance(data_files, str) else list(data_files)
        if any("://" in p for p in patterns):
            return None
        files: list[str] = []
        for pattern in patterns:
            matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not matched:
                raise ValueError(f"data_files pattern {pattern!r} matches no file; check the path "
                                 f"(relative to {os.getcwd()})")
            files += matched
        kept = [f for f in files if self._has_rows(f)]
        self.skipped_files = [f for f in files if f not in kept]
        for f in self.skipped_files:
            log.warning("skipping %s: it holds no rows", f)
        if not kept:
            raise ValueError(f"every file matched by {data_files!r} is empty ({len(files)} files)")
        return kept

    def _has_rows(self, path: str) -> bool:
        if os.path.getsize(path) == 0:
            return False
        if self.name != "parquet":
            return True
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows > 0
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
            raise ValueError(f"{path} is not a readable parquet file ({type(e).__name__}: {e}); "
                             f"re-download it or remove it from data_files") from e

    def _check_text_column(self, dataset) -> None:
        features = dataset.features
        if features is None:  # unknown until read (json without a schema): rows are checked one by one
            return
        if self.text_field not in features:
            raise KeyError(f"dataset {self.source!r} has no column {self.text_field!r} (columns: "
                           f"{sorted(features)}); choose the text column with data.text_field")
        dtype = getattr(features[self.text_field], "dtype", None)
        if dtype is not None and dtype not in _TEXT_TYPES and dtype != "json":
            raise ValueError(f"column {self.text_field!r} of {self.source!r} holds {dtype} values, not text; "
                             f"choose the text column with data.text_field")

    def set_num_streams(self, num_streams: int) -> None:
        """Split into `num_streams` streams: by shard where there are enough (parquet row groups count
        once files do not suffice), else by example."""
        if num_streams < 1:
            raise ValueError(f"the stream count must be positive, got {num_streams}")
        self.num_streams = num_streams
        self._base = self.dataset
        if self._base.num_shards < num_streams:
            self._base = self._base.reshard()
        self.by_shard = self._base.num_shards >= num_streams
        if not self.by_shard:
            log.info("%s has %d shards for %d streams: every stream reads all rows and keeps 1 in %d",
                     self.source, self._base.num_shards, num_streams, num_streams)

    def stream_dataset(self, stream: int):
        """A fresh `IterableDataset` of stream `stream`'s rows, in the dataset's order."""
        if self.by_shard:
            return self._base.shard(num_shards=self.num_streams, index=stream, contiguous=False)
        from datasets.distributed import split_dataset_by_node

        return split_dataset_by_node(self._base, rank=stream, world_size=self.num_streams, strategy="examples")

    def describe(self, stream: int) -> str:
        """Stream `stream` in words, for errors: its files when known."""
        if self.files is not None and self.by_shard and len(self.files) == self._base.num_shards:
            files = self.files[stream::self.num_streams]
            return f"stream {stream} of {self.source} ({', '.join(files[:4])}{' ...' if len(files) > 4 else ''})"
        return f"stream {stream} of {self.source}"

    def text_of(self, row: dict, where: str) -> str | None:
        """The row's document, or None for a skipped row (counted)."""
        if self.text_field not in row:
            raise KeyError(f"{where}: rows have no field {self.text_field!r} (fields: {sorted(row)}); "
                           f"choose the text column with data.text_field")
        text = row[self.text_field]
        if isinstance(text, str) and text:
            return text
        kind = "empty" if text is None or text == "" else "not_text"
        if kind == "not_text" and not self.counts[kind]:
            log.warning("%s: a row's %r is %s, not text; such rows are skipped and counted",
                        where, self.text_field, type(text).__name__)
        self.counts[kind] += 1
        return None

    def reader(self, stream: int, state: dict | None, skip_rows: int = 0) -> "RowReader":
        return RowReader(self, stream, state, skip_rows)

    def validation_documents(self, n: int, split: str | None) -> list[str]:
        """The first `n` documents of `split` (the whole split, unsharded) or, for split None, of stream 0
        (the rows that stream 0 skips in every epoch)."""
        if split is None:
            docs, _ = self.reader(0, None).read(n)
            return docs
        dataset = self._load(split)
        self._check_text_column(dataset)
        docs = []
        for row in _wrap_errors(iter(dataset), lambda: f"split {split!r} of {self.source}"):
            if len(docs) == n:
                break
            text = self.text_of(row, f"split {split!r} of {self.source}")
            if text is not None:
                docs.append(text)
        return docs


class RowReader:
    """Stream `stream`'s documents from a saved `datasets` position (None = the start of the stream,
    after `skip_rows` held-out rows)."""

    def __init__(self, source: StreamSource, stream: int, state: dict | None, skip_rows: int = 0) -> None:
        self.source, self.stream = source, stream
        self._dataset = source.stream_dataset(stream)
        if state is not None:
            self._dataset.load_state_dict(state)
        self._rows = _wrap_errors(iter(self._dataset), lambda: source.describe(stream))
        if state is None and skip_rows:
            self.read(skip_rows)

    def read(self, n_rows: int) -> tuple[list[str], bool]:
        """The documents among the next `n_rows` rows, and whether the stream ended before that."""
        docs = []
        where = self.source.describe(self.stream)
        for _ in range(n_rows):
            row = next(self._rows, None)
            if row is None:
                return docs, True
            text = self.source.text_of(row, where)
            if text is not None:
                docs.append(text)
        return docs, False

    def state(self) -> dict:
        """`datasets`' position after the last row read: primitives only."""
        return self._dataset.state_dict()

    def close(self) -> None:
        """Close the open shard now (not at interpreter exit, when its reader's modules are gone)."""
        self._rows.close()


def _wrap_errors(rows, where):
    """Re-raise a reading failure (corrupt shard, bad JSON) naming the stream and the shard."""
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise RuntimeError(f"{where()}: reading failed ({type(e).__name__}: {e}). The shard is damaged or "
                               f"not in the builder's format: fix it or remove it from data_files") from e
        yield row
