"""Tokenizers, document sources, token preparation and batch loaders."""

import importlib

from dsmoe.data.loader import StreamingBatches, TokenBatches, val_batches
from dsmoe.data.sources import iter_documents, iter_hf_documents, iter_local_documents, shakespeare_path
from dsmoe.data.tokenizer import ByteTokenizer, TiktokenTokenizer, Tokenizer, get_tokenizer, padded_vocab_size

# dsmoe.data.prepare is also a script (python -m dsmoe.data.prepare). Importing it here eagerly
# would make runpy warn that the module was imported before being run, so its names load on first
# use. The function prepare() itself is dsmoe.data.prepare.prepare: the package attribute `prepare`
# is the module.
_FROM_PREPARE = ("ensure_prepared", "is_prepared", "load_meta", "load_prepared", "prepared_dir", "token_dtype")


def __getattr__(name: str):
    if name in _FROM_PREPARE:
        return getattr(importlib.import_module("dsmoe.data.prepare"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ByteTokenizer", "StreamingBatches", "TiktokenTokenizer", "TokenBatches", "Tokenizer",
    "get_tokenizer", "iter_documents", "iter_hf_documents", "iter_local_documents",
    "padded_vocab_size", "shakespeare_path", "val_batches", *_FROM_PREPARE,
]
