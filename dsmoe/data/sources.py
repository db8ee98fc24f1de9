"""Where documents come from: the vendored corpus, local files, or a Hugging Face dataset.

Every source is an iterator of non-empty document strings, read lazily so a corpus larger than
memory streams through.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

# The repository's data/ folder; tests point this at a temporary copy.
CORPUS_DIR = Path(__file__).resolve().parents[2] / "data"
SHAKESPEARE = "shakespeare"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
ACCEPTED_SOURCES = (f"'{SHAKESPEARE}' (the vendored corpus), a .txt/.md/.jsonl file, a folder of them, "
                    "a prepared-token folder (holding meta.json), or 'hf:NAME' (a Hugging Face dataset)")

HfDataFiles = str | Sequence[str] | Mapping[str, str | Sequence[str]]


class DataError(ValueError):
    """The data cannot be read as it is (a line that is not UTF-8 or not JSON, a position past the end of
    its document): the message names the file and line, or the stream, and the fix."""


def iter_documents(source: str = SHAKESPEARE, *, hf_config: str | None = None, split: str = "train",
                   streaming: bool = True, text_field: str = "text", data_files: HfDataFiles | None = None,
                   hf_options: Mapping[str, Any] | None = None) -> Iterator[str]:
    """Yield the source's documents, skipping empty ones (they would add nothing but an end-of-text).

    `hf_config`, `split`, `streaming`, `data_files` and `hf_options` (extra load_dataset keywords such
    as `revision` or the text builder's `sample_by`) apply to `hf:` sources; `text_field` to `hf:`
    and .jsonl sources.
    """
    if source.startswith("hf:"):
        documents = iter_hf_documents(source.removeprefix("hf:"), hf_config=hf_config, split=split,
                                      streaming=streaming, text_field=text_field,
                                      data_files=data_files, hf_options=hf_options)
    elif source == SHAKESPEARE:
        documents = iter([shakespeare_path().read_text(encoding="utf-8")])
    else:
        documents = iter_local_documents(Path(source), text_field=text_field)
    return (doc for doc in documents if doc)


def shakespeare_path() -> Path:
    """The vendored corpus, after checking it against data/SHA256SUMS."""
    path = CORPUS_DIR / SHAKESPEARE_FILE
    sums = CORPUS_DIR / "SHA256SUMS"
    if not path.is_file() or not sums.is_file():
        raise FileNotFoundError(
            f"the vendored corpus is missing: expected {path} and {sums}. Restore them from git "
            f"(git checkout -- data/), or install dsmoe in editable mode (pip install -e .) so the "
            f"repository's data/ folder is found")
    expected = _expected_digest(sums, SHAKESPEARE_FILE)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(f"{path} is corrupted: its sha256 is {actual}, {sums.name} expects {expected}. "
                         f"Restore it from git: git checkout -- data/{SHAKESPEARE_FILE}")
    return path


def _expected_digest(sums: Path, file_name: str) -> str:
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.lstrip("*") == file_name:
            return digest
    raise ValueError(f"{sums} has no line for {file_name}; restore it from git: git checkout -- data/")


def local_files(path: Path) -> list[Path]:
    """The document files a local source reads: the file itself, or every .txt/.md/.jsonl below a
    folder in sorted order (so the token stream does not depend on the file system's listing order)."""
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES + (JSONL_SUFFIX,):
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .md or .jsonl")
        return [path]
    if path.is_dir():
        if (path / "meta.json").is_file():
            raise ValueError(f"{path} holds prepared tokens (meta.json), not documents; "
                             f"read it with dsmoe.data.load_prepared")
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix in TEXT_SUFFIXES + (JSONL_SUFFIX,))
        if not files:
            raise FileNotFoundError(f"{path} contains no .txt, .md or .jsonl files")
        return files
    raise FileNotFoundError(f"data source {str(path)!r} does not exist. Accepted sources: {ACCEPTED_SOURCES}")


def iter_local_documents(path: Path, *, text_field: str = "text") -> Iterator[str]:
    """A .txt/.md file is one document; a .jsonl file holds one document per line.
    A missing path fails here, at the call, not at the first next()."""
    return _iter_files(local_files(path), text_field)


def _iter_files(files: list[Path], text_field: str) -> Iterator[str]:
    for file in files:
        if file.suffix == JSONL_SUFFIX:
            yield from _iter_jsonl(file, text_field)
        else:
            yield _decode(file.read_bytes(), file)


def _decode(data: bytes, file: Path, first_line: int = 1) -> str:
    """`data` (the file's bytes from line `first_line` on) as UTF-8, or a DataError naming the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data[:e.start].count(b"\n")
        raise DataError(f"{file}:{line} is not UTF-8 text (byte {data[e.start]:#04x}): re-encode the file as "
                        f"UTF-8, e.g. iconv -f latin1 -t utf-8 {file.name} > {file.stem}.utf8{file.suffix}") from None


def _iter_jsonl(file: Path, text_field: str) -> Iterator[str]:
    with file.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            line = _decode(raw, file, line_number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{line_number} is not a JSON line ({e.msg}, column {e.colno}): fix or "
                                f"remove that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{file}:{line_number} is not a JSON object: each line must be one document, "
                                f'like {{"{text_field}": "..."}}')
            if text_field not in row:
                raise KeyError(f"{file}:{line_number} has no field {text_field!r} (fields: "
                               f"{sorted(row)}); choose the text field with text_field / --text-field")
            yield row[text_field]


def iter_hf_documents(name: str, *, hf_config: str | None = None, split: str = "train",
                      streaming: bool = True, text_field: str = "text",
                      data_files: HfDataFiles | None = None,
                      hf_options: Mapping[str, Any] | None = None) -> Iterator[str]:
    """The `text_field` of every row of `datasets.load_dataset(name, hf_config, ...)`. `name` is a Hub
    dataset (wikitext, HuggingFaceTB/smollm-corpus) or a packaged builder (text, json) given
    `data_files`. Loading starts at the call; rows are read as the iterator is consumed."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("'hf:' data sources need the datasets package: pip install datasets") from e
    dataset = datasets.load_dataset(name, hf_config, split=split, streaming=streaming,
                                    data_files=data_files, **dict(hf_options or {}))
    return _iter_rows(dataset, name, text_field)


def _iter_rows(dataset, name: str, text_field: str) -> Iterator[str]:
    for row in dataset:
        if text_field not in row:
            raise KeyError(f"dataset {name!r} rows have no field {text_field!r} (fields: {sorted(row)}); "
                           f"choose the text field with text_field / --text-field")
        yield row[text_field]


def source_fingerprint(source: str) -> str | None:
    """Something that changes when a local source's files change, so a token cache keyed on it is
    not reused stale. None for sources that are fixed by name (the checksummed corpus, hf:)."""
    if source == SHAKESPEARE or source.startswith("hf:"):
        return None
    path = Path(source)
    digest = hashlib.sha256()
    for file in local_files(path):
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0"
                      f"{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
