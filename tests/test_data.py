"""dsmoe.data: tokenizers, sources, prepare/cache, and the batch loaders."""

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from dsmoe.data import prepare as prepare_module
from dsmoe.data import sources
from dsmoe.data import (TokenBatches, ensure_prepared, get_tokenizer, iter_documents,
                        load_prepared, padded_vocab_size, prepared_dir, shakespeare_path, val_batches)
from dsmoe.data.prepare import prepare

CORPUS = sources.CORPUS_DIR / "tinyshakespeare.txt"


@pytest.fixture
def no_downloads(monkeypatch, tmp_path):
    """Build tokenizers afresh with any URL read failing, to prove they need no network."""
    import tiktoken.load

    real_read_file = tiktoken.load.read_file

    def local_only(blobpath):
        assert "://" not in blobpath, f"tried to download {blobpath}"
        return real_read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", local_only)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


# --- tokenizers ---------------------------------------------------------------------------------

def test_byte_tokenizer_round_trips_non_ascii():
    tok = get_tokenizer("byte")
    text = "Thou art — naïve ☃ 日本"
    ids = tok.encode(text)
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids + [tok.eot_id]) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode([0xE2, 0x98]) == "\ufffd"  # a truncated character decodes, replaced


def test_gpt2_offline(no_downloads):
    tok = get_tokenizer("tiktoken:gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eot_id, tok.name) == (50257, 50256, "tiktoken:gpt2")
    text = "Hello world, naïve ☃ <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eot_id not in tok.encode(text)  # literal special-token text stays text


def test_cl100k_offline(no_downloads):
    tok = get_tokenizer("tiktoken:cl100k_base")
    assert tok.encode("hello world") == [15339, 1917]
    assert (tok.vocab_size, tok.eot_id) == (100277, 100257)
    assert tok.decode(tok.encode("naïve ☃")) == "naïve ☃"


def test_tokenizers_are_cached_and_unknown_names_rejected():
    assert get_tokenizer("byte") is get_tokenizer("byte")
    with pytest.raises(ValueError, match="'byte' or 'tiktoken:ENCODING'"):
        get_tokenizer("gpt2")
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'no_such_encoding'"):
        get_tokenizer("tiktoken:no_such_encoding")


def test_padded_vocab_size():
    assert padded_vocab_size(257) == 320
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(49152) == 49152
    assert padded_vocab_size(257, multiple=128) == 384


# --- sources --------------------------------------------------------------------------------------

def _corrupt_corpus_copy(tmp_path):
    corpus_dir = tmp_path / "data"
    corpus_dir.mkdir()
    shutil.copy(sources.CORPUS_DIR / "SHA256SUMS", corpus_dir / "SHA256SUMS")
    data = bytearray(CORPUS.read_bytes())
    data[1000] ^= 1
    (corpus_dir / "tinyshakespeare.txt").write_bytes(bytes(data))
    return corpus_dir


def test_shakespeare_is_verified(monkeypatch, tmp_path):
    expected = (sources.CORPUS_DIR / "SHA256SUMS").read_text().split()[0]
    assert hashlib.sha256(shakespeare_path().read_bytes()).hexdigest() == expected
    assert list(iter_documents()) == [CORPUS.read_text(encoding="utf-8")]

    monkeypatch.setattr(sources, "CORPUS_DIR", _corrupt_corpus_copy(tmp_path))
    with pytest.raises(ValueError, match=r"tinyshakespeare\.txt is corrupted.*git checkout"):
        list(iter_documents("shakespeare"))


def _write_corpus_folder(root):
    """A folder source: nested text files and a jsonl, plus a file type that is ignored."""
    (root / "b").mkdir(parents=True)
    (root / "a.txt").write_text("first document\n", encoding="utf-8")
    (root / "b" / "c.md").write_text("# second — ünïcode\n", encoding="utf-8")
    (root / "b" / "d.jsonl").write_text(
        json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "", "id": 2}) + "\n"
        + json.dumps({"text": "fourth ☃"}) + "\n", encoding="utf-8")
    (root / "b" / "ignored.csv").write_text("x,y\n")
    return ["first document\n", "# second — ünïcode\n", "third", "fourth ☃"]


def test_local_sources(tmp_path):
    expected = _write_corpus_folder(tmp_path / "corpus")
    assert list(iter_documents(str(tmp_path / "corpus"))) == expected
    assert list(iter_documents(str(tmp_path / "corpus" / "b" / "d.jsonl"))) == expected[2:]
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError, match="no field 'text'"):
        list(iter_documents(str(tmp_path / "other.jsonl")))
    assert list(iter_documents(str(tmp_path / "other.jsonl"), text_field="body")) == ["x"]


def test_missing_source_names_path_and_accepted_forms(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*does not exist.*shakespeare.*hf:NAME"):
        iter_documents(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(missing, "byte", tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_hf_path_matches_local_path(tmp_path):
    expected = _write_corpus_folder(tmp_path)
    jsonl = tmp_path / "b" / "d.jsonl"
    assert list(iter_documents("hf:json", data_files=[str(jsonl)])) == list(iter_documents(str(jsonl)))
    text_file = tmp_path / "a.txt"
    hf_text = iter_documents("hf:text", data_files=str(text_file),
                             hf_options={"sample_by": "document", "keep_linebreaks": True})
    assert list(hf_text) == list(iter_documents(str(text_file))) == expected[:1]
    assert list(iter_documents("hf:json", data_files=str(jsonl), streaming=False)) == expected[2:]


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        iter_documents("hf:wikitext", hf_config="wikitext-103-raw-v1")


# --- prepare ----------------------------------------------------------------------------------------

def test_prepare_shakespeare_bytes(tmp_path):
    meta = prepare("shakespeare", "byte", tmp_path, val_fraction=0.1)
    meta_read, train, val = load_prepared(tmp_path)
    assert meta == meta_read
    assert meta["dtype"] == "uint16" and train.dtype == np.uint16 and isinstance(train, np.memmap)
    text = CORPUS.read_text(encoding="utf-8")
    stream = np.concatenate([train, val])
    assert stream[-1] == 256 and 256 not in stream[:-1]
    assert bytes(stream[:-1].astype(np.uint8)).decode("utf-8") == text
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert len(val) == round(0.1 * (len(text.encode()) + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_cl100k_uses_uint32_and_packs_documents(tmp_path):
    docs = _write_corpus_folder(tmp_path / "corpus")
    meta = prepare(str(tmp_path / "corpus"), "tiktoken:cl100k_base", tmp_path / "out", val_fraction=0.25)
    _, train, val = load_prepared(tmp_path / "out")
    assert meta["dtype"] == "uint32" and train.dtype == np.uint32 and meta["documents"] == len(docs)
    tok = get_tokenizer("tiktoken:cl100k_base")
    expected = [t for doc in docs for t in tok.encode(doc) + [tok.eot_id]]
    assert np.concatenate([train, val]).tolist() == expected
    assert tok.decode([t for t in expected if t != tok.eot_id]) == "".join(docs)


def test_prepare_from_hf_equals_prepare_from_local(tmp_path):
    _write_corpus_folder(tmp_path / "corpus")
    jsonl = str(tmp_path / "corpus" / "b" / "d.jsonl")
    prepare(jsonl, "byte", tmp_path / "local", val_fraction=0.0)
    prepare("hf:json", "byte", tmp_path / "hf", val_fraction=0.0, data_files=[jsonl])
    (_, local, local_val), (meta, hf, _) = load_prepared(tmp_path / "local"), load_prepared(tmp_path / "hf")
    assert np.array_equal(local, hf) and len(local_val) == 0
    assert meta["source"] == "hf:json" and meta["data_files"] == [jsonl]


def test_interrupted_prepare_never_looks_done(tmp_path):
    corpus = tmp_path / "corpus"
    _write_corpus_folder(corpus)
    prepare(str(corpus), "byte", tmp_path / "out")
    (corpus / "b" / "d.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(KeyError):
        prepare(str(corpus), "byte", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.bin", "val.bin"]
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_prepared(tmp_path / "out")


def test_load_prepared_rejects_corrupt_directories(tmp_path):
    prepare("shakespeare", "byte", tmp_path, max_documents=1)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.*prepare it again"):
        load_prepared(tmp_path)
    prepare("shakespeare", "byte", tmp_path)
    with open(tmp_path / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"train\.bin should hold .* has 10 bytes"):
        load_prepared(tmp_path)


def test_ensure_prepared_caches_and_reuses(tmp_path):
    cache = tmp_path / "cache"
    first = ensure_prepared("shakespeare", "byte", cache)
    assert first == prepared_dir("shakespeare", "byte", cache, val_fraction=0.05)
    assert first.name.startswith("shakespeare-byte-")
    assert prepared_dir("shakespeare", "byte", cache, val_fraction=0.1) != first
    assert prepared_dir("shakespeare", "tiktoken:gpt2", cache) != first
    with pytest.raises(TypeError):
        prepared_dir("shakespeare", "byte", cache, no_such_option=1)

    written = [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(first.iterdir())]
    assert ensure_prepared("shakespeare", "byte", cache) == first
    assert [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(first.iterdir())] == written
    # A prepared directory is a source as it is, with its own tokenizer.
    assert ensure_prepared(str(first), "byte", tmp_path / "elsewhere") == first
    with pytest.raises(ValueError, match="prepared with tokenizer 'byte'"):
        ensure_prepared(str(first), "tiktoken:gpt2", cache)


def test_cache_key_follows_local_file_changes(tmp_path):
    source = tmp_path / "doc.txt"
    source.write_text("one")
    before = prepared_dir(str(source), "byte", tmp_path)
    source.write_text("one two")
    assert prepared_dir(str(source), "byte", tmp_path) != before


def test_cli(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("To be, or not to be")
    prepare_module.main(["--source", str(tmp_path / "doc.txt"), "--tokenizer", "byte",
                         "--out", str(tmp_path / "out"), "--val-fraction", "0.2"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == load_prepared(tmp_path / "out")[0]
    assert (printed["train_tokens"], printed["val_tokens"]) == (16, 4)


# --- loaders ------------------------------------------------------------------------------------------

SEQ = 8


def _ramp(n):
    """Token i has value i, so every row shows which window it came from."""
    return np.arange(n, dtype=np.uint32)


def test_token_batches_are_windows_and_pure():
    tokens = _ramp(10 * SEQ + 3)
    a, b = TokenBatches(tokens, SEQ, 3, seed=7), TokenBatches(tokens, SEQ, 3, seed=7)
    assert a.windows_per_epoch == 10
    for index in [5, 0, 3, 5, 12]:  # out of order, and across epoch boundaries
        x, y = a.batch(index)
        x2, y2 = b.batch(index)
        assert x.dtype == torch.int64 and x.shape == (3, SEQ)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
        assert torch.all(x[:, 0] % SEQ == 0)
        assert torch.equal(x, x[:, :1] + torch.arange(SEQ))
    assert not torch.equal(TokenBatches(tokens, SEQ, 3, seed=8).batch(0)[0], a.batch(0)[0])


def test_token_batches_cover_each_epoch_once():
    loader = TokenBatches(_ramp(12 * SEQ + 1), SEQ, 4, seed=1)
    for epoch in range(2):
        starts = torch.cat([loader.batch(epoch * 3 + i)[0][:, 0] for i in range(3)])
        assert sorted(starts.tolist()) == list(range(0, 12 * SEQ, SEQ))
    order = [loader.batch(i)[0][:, 0].tolist() for i in range(6)]
    assert order[:3] != order[3:]  # each epoch draws its own order


@pytest.mark.parametrize("world", [2, 4])
def test_token_batches_world_union_equals_single_rank(world):
    tokens = _ramp(23 * SEQ + 5)
    micro = 3
    single = TokenBatches(tokens, SEQ, world * micro, seed=3)
    ranks = [TokenBatches(tokens, SEQ, micro, rank=r, world=world, seed=3) for r in range(world)]
    for index in range(6):  # 23 windows per epoch: several batches straddle epochs
        x, y = single.batch(index)
        parts = [loader.batch(index) for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_token_batches_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenBatches(_ramp(SEQ), SEQ, 1)
    with pytest.raises(ValueError, match="rank must be in"):
        TokenBatches(_ramp(100), SEQ, 1, rank=2, world=2)
    with pytest.raises(ValueError, match="sample position"):
        TokenBatches(_ramp(100), SEQ, 1).rows(-1)


@pytest.mark.parametrize("layouts", [((1, 4, 2), (2, 2, 2)), ((2, 2, 2), (1, 8, 1)), ((4, 1, 3), (2, 6, 1))])
def test_sample_positions_are_layout_free(layouts):
    """A step reads samples [p, p + world*micro*accum): every layout reads the same windows per step."""
    tokens = _ramp(29 * SEQ + 1)

    def step_windows(world, micro, accum, p):
        loaders = [TokenBatches(tokens, SEQ, micro, rank=r, world=world, seed=2) for r in range(world)]
        rows = [loaders[r].rows(p + i * world * micro)[0][:, 0] for i in range(accum) for r in range(world)]
        return sorted(torch.cat(rows).tolist())

    (w1, m1, a1), (w2, m2, a2) = layouts
    assert w1 * m1 * a1 == w2 * m2 * a2
    per_step = w1 * m1 * a1
    for step in range(5):  # crosses epoch boundaries (29 windows per epoch)
        assert step_windows(w1, m1, a1, step * per_step) == step_windows(w2, m2, a2, step * per_step)


def test_val_batches_are_fixed_and_evenly_spaced():
    tokens = _ramp(40 * SEQ + 1)
    batches = val_batches(tokens, SEQ, 2, n_batches=5)
    assert len(batches) == 5
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == [i * 4 * SEQ for i in range(10)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, val_batches(tokens, SEQ, 2, 5)))
    assert len(val_batches(_ramp(5 * SEQ + 1), SEQ, 2, n_batches=10)) == 2
    with pytest.raises(ValueError, match="raise val_fraction"):
        val_batches(_ramp(SEQ + 1), SEQ, 2, n_batches=1)
