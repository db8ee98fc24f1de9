"""Tokenizers, document sources, token preparation and batch loaders.

Names load from their modules on first use: tokenizer worker processes import this package and
must not pay for torch (the loaders) or datasets. dsmoe.data.prepare is also a script
(python -m dsmoe.data.prepare), and importing it here eagerly would make runpy warn that the module
was imported before being run. The function prepare() itself is dsmoe.data.prepare.prepare: the
package attribute `prepare` is the module.
"""

import importlib

_EXPORTS = {
    "dsmoe.data.loader": ("TokenBatches", "val_batches"),
    "dsmoe.data.streaming": ("StreamingBatches", "merge_stream_states"),
    "dsmoe.data.sources": ("iter_documents", "iter_hf_documents", "iter_local_documents", "shakespeare_path"),
    "dsmoe.data.tokenizer": ("ByteTokenizer", "TiktokenTokenizer", "Tokenizer", "get_tokenizer", "padded_vocab_size"),
    "dsmoe.data.prepare": ("ensure_prepared", "is_prepared", "load_meta", "load_prepared", "prepared_dir",
                           "token_dtype"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_MODULE_OF)
