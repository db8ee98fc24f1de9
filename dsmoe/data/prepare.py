"""Tokenize a source once into memmap-able token files, and find or reuse them in a cache.

A prepared directory holds `train.bin` and `val.bin` (raw arrays of uint16 or uint32 token
ids: documents packed back to back, each followed by end-of-text) and `meta.json`. meta.json is
written last, so its presence means the directory is complete.

    python -m dsmoe.data.prepare --source shakespeare --tokenizer byte --out data/prepared/shakespeare
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

import numpy as np

from dsmoe.data.sources import SHAKESPEARE, HfDataFiles, iter_documents, source_fingerprint
from dsmoe.data.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
_REQUIRED_META = ("format_version", "tokenizer", "vocab_size", "eot_id", "dtype", "train_tokens", "val_tokens")
_FLUSH_TOKENS = 1 << 20  # tokens held in memory before they are appended to disk
_PROGRESS_SECONDS = 10.0


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def prepare(source: str, tokenizer_name: str, out_dir: str | os.PathLike, *, val_fraction: float = 0.05,
            hf_config: str | None = None, split: str = "train", text_field: str = "text",
            max_documents: int | None = None, data_files: HfDataFiles | None = None,
            hf_options: Mapping[str, Any] | None = None) -> dict:
    """Tokenize `source` into `out_dir`: the first (1 - val_fraction) of the token stream goes to
    train.bin, the rest to val.bin. Returns the meta.json contents."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tokenizer = get_tokenizer(tokenizer_name)
    dtype = token_dtype(tokenizer.vocab_size)
    documents = iter_documents(source, hf_config=hf_config, split=split, text_field=text_field,
                               data_files=data_files, hf_options=hf_options)
    if max_documents is not None:
        documents = itertools.islice(documents, max_documents)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # From here until the new meta.json lands, the directory must not look prepared.
    (out / META_FILE).unlink(missing_ok=True)
    # Per-process temporary names: ranks racing to prepare the same cache never share a half file.
    stream_tmp = out / f"train.bin.{os.getpid()}.tmp"
    val_tmp = out / f"val.bin.{os.getpid()}.tmp"
    try:
        n_documents, n_tokens = _write_token_stream(documents, tokenizer, dtype, stream_tmp)
        n_val = round(n_tokens * val_fraction)
        n_train = n_tokens - n_val
        if n_train < 2:
            raise ValueError(f"source {source!r} gave {n_tokens} tokens ({n_train} for training); "
                             f"training needs at least 2. Use a larger source or a smaller val_fraction")
        _move_tail(stream_tmp, val_tmp, n_train * dtype.itemsize)
        os.replace(stream_tmp, out / "train.bin")
        os.replace(val_tmp, out / "val.bin")
        meta = {
            "format_version": FORMAT_VERSION, "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "dtype": dtype.name,
            "train_tokens": n_train, "val_tokens": n_val, "documents": n_documents,
            "source": _canonical_source(source), "hf_config": hf_config, "split": split,
            "text_field": text_field, "data_files": _jsonable(data_files),
            "hf_options": _jsonable(hf_options), "max_documents": max_documents,
            "val_fraction": val_fraction,
        }
        _write_file_atomic(out / META_FILE, json.dumps(meta, indent=2).encode())
    except BaseException:
        stream_tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
        raise
    log.info("prepared %s: %d documents, %d train + %d val tokens (%s) in %s",
             source, n_documents, n_train, n_val, dtype.name, out)
    return meta


def _write_token_stream(documents: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype,
                        path: Path) -> tuple[int, int]:
    """Append every document's tokens and an end-of-text to `path`; return (documents, tokens)."""
    n_documents = n_tokens = 0
    buffer: list[int] = []
    last_report = time.monotonic()
    with path.open("wb") as f:
        for document in documents:
            buffer.extend(tokenizer.encode(document))
            buffer.append(tokenizer.eot_id)
            n_documents += 1
            if len(buffer) >= _FLUSH_TOKENS:
                n_tokens += _flush(buffer, dtype, f)
                if time.monotonic() - last_report >= _PROGRESS_SECONDS:
                    log.info("tokenized %d documents, %d tokens", n_documents, n_tokens)
                    last_report = time.monotonic()
        n_tokens += _flush(buffer, dtype, f)
        _sync(f)
    return n_documents, n_tokens


def _flush(buffer: list[int], dtype: np.dtype, f: BinaryIO) -> int:
    count = len(buffer)
    np.asarray(buffer, dtype=dtype).tofile(f)
    buffer.clear()
    return count


def _move_tail(src: Path, dst: Path, offset: int) -> None:
    """Move the bytes of `src` after `offset` into `dst`, so the split needs no second copy of the
    training tokens (the stream's length is only known once every document is tokenized)."""
    with src.open("r+b") as head, dst.open("wb") as tail:
        head.seek(offset)
        shutil.copyfileobj(head, tail, 1 << 24)
        _sync(tail)
        head.truncate(offset)
        _sync(head)


def _sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_file_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        _sync(f)
    os.replace(tmp, path)


def _canonical_source(source: str) -> str:
    """Local paths become absolute, so the same files give the same cache key from any cwd."""
    if source == SHAKESPEARE or source.startswith("hf:"):
        return source
    return str(Path(source).resolve())


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def is_prepared(source: str | os.PathLike) -> bool:
    """True for a directory that already holds prepared tokens (it is used as it is)."""
    return str(source) != SHAKESPEARE and (Path(source) / META_FILE).is_file()


def prepared_dir(source: str, tokenizer_name: str, cache_root: str | os.PathLike, **options) -> Path:
    """The cache directory for these prepare() arguments: a readable label plus a hash of every
    argument (defaults included) and, for local files, their sizes and modification times."""
    # Binding to prepare's signature rejects unknown options and fills in the same defaults.
    arguments = inspect.signature(prepare).bind(source, tokenizer_name, None, **options)
    arguments.apply_defaults()
    key = {name: value for name, value in arguments.arguments.items() if name != "out_dir"}
    key.update(source=_canonical_source(source), fingerprint=source_fingerprint(source),
               format_version=FORMAT_VERSION)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(source.removeprefix('hf:')).name}-{tokenizer_name}")
    return Path(cache_root) / f"{label}-{digest}"


def ensure_prepared(source: str, tokenizer_name: str, cache_root: str | os.PathLike, **options) -> Path:
    """The directory of prepared tokens for `source`: the source itself when it is a prepared
    directory, else its cache directory under `cache_root`, prepared first if it is not complete.
    Under torchrun call it on one rank, then barrier, so the others do not tokenize too."""
    if is_prepared(source):
        meta = load_meta(source)
        if meta["tokenizer"] != tokenizer_name:
            raise ValueError(f"{source} was prepared with tokenizer {meta['tokenizer']!r}, but "
                             f"{tokenizer_name!r} was asked for; set the tokenizer to {meta['tokenizer']!r}")
        return Path(source)
    out = prepared_dir(source, tokenizer_name, cache_root, **options)
    if not (out / META_FILE).is_file():
        prepare(source, tokenizer_name, out, **options)
    return out


def load_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{path} has no {META_FILE}: it is not a prepared token directory, or its preparation was "
            f"interrupted. Prepare it: python -m dsmoe.data.prepare --source SOURCE --tokenizer T --out {path}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is corrupt ({e}); delete {path} and prepare it again") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} does not hold a JSON object; delete {path} and prepare it again")
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {missing}; delete {path} and prepare it again")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format_version {meta['format_version']}, this dsmoe reads "
                         f"{FORMAT_VERSION}; delete {path} and prepare it again")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{meta_path}: dtype must be uint16 or uint32, got {meta['dtype']!r}")
    return meta


def load_prepared(directory: str | os.PathLike) -> tuple[dict, np.ndarray, np.ndarray]:
    """(meta, train tokens, val tokens); the token arrays are read-only memmaps (an empty val split
    is a plain empty array, since an empty file cannot be mapped)."""
    meta = load_meta(directory)
    dtype = np.dtype(meta["dtype"])
    train = _open_tokens(Path(directory) / "train.bin", dtype, meta["train_tokens"])
    val = _open_tokens(Path(directory) / "val.bin", dtype, meta["val_tokens"])
    return meta, train, val


def _open_tokens(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    expected = count * dtype.itemsize
    actual = path.stat().st_size if path.is_file() else None
    if actual != expected:
        raise ValueError(f"{path} should hold {count} {dtype.name} tokens ({expected} bytes) but "
                         f"{'is missing' if actual is None else f'has {actual} bytes'}; "
                         f"delete {path.parent} and prepare it again")
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--hf-option takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers and true/false keep their type
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsmoe.data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=SHAKESPEARE,
                        help="shakespeare, a .txt/.md/.jsonl file or folder, or hf:NAME")
    parser.add_argument("--tokenizer", required=True, help="byte or tiktoken:ENCODING (e.g. tiktoken:gpt2)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--hf-config", default=None, help="dataset configuration, e.g. wikitext-103-raw-v1")
    parser.add_argument("--split", default="train")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--data-files", nargs="+", default=None, help="files for hf:text / hf:json")
    parser.add_argument("--hf-option", type=_parse_option, action="append", default=[],
                        metavar="KEY=VALUE", help="extra datasets.load_dataset keyword, e.g. revision=main")
    parser.add_argument("--max-documents", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    meta = prepare(args.source, args.tokenizer, args.out, val_fraction=args.val_fraction,
                   hf_config=args.hf_config, split=args.split, text_field=args.text_field,
                   max_documents=args.max_documents, data_files=args.data_files,
                   hf_options=dict(args.hf_option) or None)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
