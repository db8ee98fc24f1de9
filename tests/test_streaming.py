"""Streaming batches from a dataset in the Hugging Face layout (parquet and jsonl shards the test writes),
read through `datasets` exactly as a Hub dataset would be: resume equals the uninterrupted stream at
world 1 and 2 and across world sizes, ranks read disjoint documents that together cover the stream,
and damaged or odd data gets its error or a counted skip."""

import contextlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dsmoe.data import get_tokenizer, merge_stream_states, val_batches
from dsmoe.data.streaming import StreamingBatches

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, never a stuck suite

EOT = get_tokenizer("byte").eot_id
SEQ, MICRO, SHARDS = 64, 2, 4


def _documents(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [f"[{i:03d}]" + "".join(rng.choice(list("abcdé xyz"), int(rng.integers(3, 60)))) for i in range(n)]


DOCS = _documents(160)
FILE_DOCS = [DOCS[k::SHARDS] for k in range(SHARDS)]  # shard k of the layout


def _write(folder, docs_per_file, fmt, name="train"):
    folder.mkdir(parents=True, exist_ok=True)
    n = len(docs_per_file)
    for k, docs in enumerate(docs_per_file):
        path = folder / f"{name}-{k:05d}-of-{n:05d}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path, row_group_size=8)
        else:
            path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(folder / f"{name}-*.{fmt}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{fmt: data_files glob}: the same documents as 4 parquet shards and as 4 jsonl shards."""
    root = tmp_path_factory.mktemp("hf-layout")
    return {fmt: _write(root / fmt / "data", FILE_DOCS, fmt) for fmt in ("parquet", "json")}


def _stream(corpus, fmt="parquet", *, rank=0, world=1, **kw):
    options = dict(seed=7, shuffle_buffer=6, workers=0, val_documents=0, data_files=corpus[fmt])
    options.update(kw)
    return StreamingBatches(f"hf:{fmt}", "byte", SEQ, MICRO, rank=rank, world=world, **options)


def _read(ranks, n):
    """n batches from every rank: [batch][rank] -> x."""
    return [[next(r)[0] for r in ranks] for _ in range(n)]


def _windows(batches, rank=0):
    """Every window (x rows) rank `rank` read, in order: int64 [n, SEQ]."""
    return torch.cat([b[rank] for b in batches])


def _reload(tmp_path, state):
    torch.save(state, tmp_path / "data_state.pt")
    return torch.load(tmp_path / "data_state.pt", weights_only=True)


@pytest.mark.parametrize("fmt", ["parquet", "json"])
@pytest.mark.parametrize("world", [1, 2])
def test_resume_equals_uninterrupted(corpus, fmt, world, tmp_path):
    """Stop at batch 15 (inside a later shuffle block), resume, stop again at 37, resume, read to 64
    (every stream into its second epoch): the same windows as reading 64 straight."""
    n, stops = 64, (15, 37)
    straight = _read([_stream(corpus, fmt, rank=r, world=world) for r in range(world)], n)
    ranks = [_stream(corpus, fmt, rank=r, world=world) for r in range(world)]
    read, done = [], 0
    for stop in (*stops, n):
        read += _read(ranks, stop - done)
        done = stop
        state = _reload(tmp_path, merge_stream_states([r.state_dict() for r in ranks]))
        assert state["samples"] == world * done * MICRO
        ranks = [_stream(corpus, fmt, rank=r, world=world) for r in range(world)]
        for r in ranks:
            r.load_state_dict(state)
        if done == stops[0]:
            assert all(p["block"] > 0 and p["start"] is not None for p in state["streams"].values())
    assert all(p["epoch"] >= 1 for p in state["streams"].values())
    for rank in range(world):
        assert torch.equal(_windows(read, rank), _windows(straight, rank))


def _stream_tokens(windows: torch.Tensor) -> list[int]:
    """Consecutive windows of one stream back to its token sequence (each window after the first
    starts with the previous one's last token; x rows end one token earlier, so rows just chain)."""
    return windows.flatten().tolist()


def _docs_of(tokens: list[int]) -> list[str]:
    """Whole documents in a token sequence (the first, partial one dropped unless it starts the stream)."""
    text = bytes(t if t != EOT else 0 for t in tokens).decode("utf-8", errors="replace")
    return [d for d in text.split("\0")[:-1] if d.startswith("[")]


def test_ranks_are_disjoint_and_cover_the_stream(corpus):
    """World 1 takes window j from stream j % 4 (one shard each, shuffled in blocks); at world 2 rank r
    reads exactly world 1's windows r, r + 2, ...: nothing shared, nothing left out."""
    n = 36  # 18 batches of 2 windows per stream: each stream passes the end of its shard
    world1 = _windows(_read([_stream(corpus)], 2 * n))
    ranks = _read([_stream(corpus, rank=r, world=2) for r in range(2)], n)
    for r in range(2):
        assert torch.equal(_windows(ranks, r), world1[r::2])
    per_stream = [_docs_of(_stream_tokens(world1[s::SHARDS])) for s in range(SHARDS)]
    for s, docs in enumerate(per_stream):
        epoch = docs[:len(FILE_DOCS[s])]
        assert sorted(epoch) == sorted(FILE_DOCS[s])  # each document of the shard once per epoch
        assert epoch != FILE_DOCS[s]  # in a shuffled order
    rank_docs = [{d for s in range(2) for d in _docs_of(_stream_tokens(_windows(ranks, r)[s::2]))} for r in range(2)]
    assert rank_docs[0].isdisjoint(rank_docs[1]) and rank_docs[0] | rank_docs[1] == set(DOCS)


def test_examples_split_when_fewer_shards_than_ranks(tmp_path):
    """One file, two ranks: each rank keeps every other row; together they hold every document once."""
    data_files = _write(tmp_path / "one", [DOCS[:40]], "json")
    ranks = [StreamingBatches("hf:json", "byte", SEQ, MICRO, rank=r, world=2, data_files=data_files,
                              shuffle_buffer=1, workers=0, val_documents=0) for r in range(2)]
    assert ranks[0].num_streams == 2 and not ranks[0].source.by_shard
    batches = _read(ranks, 10)
    docs = [_docs_of(_stream_tokens(_windows(batches, r)))[:20] for r in range(2)]
    assert docs[0] == DOCS[0:40:2] and docs[1] == DOCS[1:40:2]


def _per_stream_windows(corpus, counts: dict[int, int]) -> Counter:
    """The first counts[s] windows of every stream s, from an uninterrupted world-1 read."""
    world1 = _windows(_read([_stream(corpus)], max(counts.values()) * SHARDS // MICRO + 1))
    return Counter(tuple(w) for s, n in counts.items() for w in world1[s::SHARDS][:n].tolist())


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (4, 3)])
def test_resume_at_another_world_size(corpus, before, after, tmp_path):
    """The windows read before and after the resume are exactly the first windows of every stream:
    none skipped, none repeated. When both world sizes divide the 4 streams the resumed ranks even
    continue the uninterrupted world-1 order."""
    k, n = 12, 8
    first = [_stream(corpus, rank=r, world=before) for r in range(before)]
    head = _read(first, k)
    state = _reload(tmp_path, merge_stream_states([r.state_dict() for r in first]))
    with pytest.warns(UserWarning, match="unequal") if SHARDS % after else contextlib.nullcontext():
        resumed = [_stream(corpus, rank=r, world=after) for r in range(after)]
    for r in resumed:
        r.load_state_dict(state)
    tail = _read(resumed, n)
    final = merge_stream_states([r.state_dict() for r in resumed])
    counts = {s: p["windows"] for s, p in final["streams"].items()}
    read = Counter(tuple(w) for batches, world in ((head, before), (tail, after))
                   for r in range(world) for w in _windows(batches, r).tolist())
    assert read == _per_stream_windows(corpus, counts)
    if SHARDS % after == 0:
        world1 = _windows(_read([_stream(corpus)], before * k + after * n))
        done = before * k * MICRO
        for r in range(after):
            assert torch.equal(_windows(tail, r), world1[done + r::after][:n * MICRO])


def test_resume_refusals(corpus):
    ranks = [_stream(corpus, rank=r, world=2, streams=2) for r in range(2)]
    _read(ranks, 2)
    merged = merge_stream_states([r.state_dict() for r in ranks])
    with pytest.warns(UserWarning, match="unequal"), pytest.raises(ValueError, match="fewer than the 3 ranks"):
        _stream(corpus, world=3, rank=0).load_state_dict(merged)
    with pytest.raises(ValueError, match="tokenizer 'byte' -> 'tiktoken:gpt2'"):
        StreamingBatches("hf:parquet", "tiktoken:gpt2", SEQ, MICRO, data_files=corpus["parquet"], seed=7,
                         shuffle_buffer=6, workers=0, val_documents=0).load_state_dict(merged)
    with pytest.raises(ValueError, match="seed 7 -> 8"):
        _stream(corpus, seed=8).load_state_dict(merged)
    with pytest.raises(ValueError, match=r"no position for streams \[1\]"):
        _stream(corpus).load_state_dict(ranks[0].state_dict())
    with pytest.raises(ValueError, match="streams \\[1\\] are in no rank's state"):
        merge_stream_states([ranks[0].state_dict()])
    with pytest.raises(ValueError, match="every rank needs at least one stream"):
        _stream(corpus, world=3, streams=2)


def test_workers_give_the_same_stream_and_resume(corpus, tmp_path):
    with _stream(corpus, "json", workers=0, shuffle_buffer=40) as inline:
        expected = _windows(_read([inline], 12))
    with _stream(corpus, "json", workers=2, shuffle_buffer=40) as pooled:
        head = _read([pooled], 5)
        state = _reload(tmp_path, pooled.state_dict())
    with _stream(corpus, "json", workers=2, shuffle_buffer=40) as resumed:
        resumed.load_state_dict(state)
        assert torch.equal(_windows(head + _read([resumed], 7)), expected)


def test_a_dead_worker_is_an_error_not_a_hang(corpus):
    import os
    import signal

    with _stream(corpus, "json", workers=1, shuffle_buffer=4) as stream:
        next(stream)
        for pid in list(stream.pool._executor._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="tokenizer worker process died"):
            _read([stream], 50)


def test_validation_holds_out_the_first_documents_of_stream_0(corpus, tmp_path):
    stream = _stream(corpus, val_documents=3)
    val = stream.validation_tokens()
    assert _docs_of(val.tolist()) == FILE_DOCS[0][:3]
    assert len(val_batches(val, 8, 2, 4)) == 4
    trained = set(_docs_of(_stream_tokens(_windows(_read([stream], 64))[0::SHARDS])))
    assert trained == set(FILE_DOCS[0][3:])  # more than an epoch of stream 0, never the held-out rows
    split_files = {"train": corpus["parquet"], "validation": _write(tmp_path / "val", [DOCS[:5]], "parquet", "val")}
    separate = _stream(corpus, data_files=split_files, val_split="validation", val_documents=4)
    assert _docs_of(separate.validation_tokens().tolist()) == DOCS[:4]
    assert separate.fixed["held_out"] == 0


# ----------------------------------------------------------------------------- bad data


def _bad(tmp_path, name, shards):
    """A 2-shard jsonl or parquet layout whose shard 1 is `shards[1]` (raw bytes or rows)."""
    folder = tmp_path / name
    folder.mkdir()
    fmt = "parquet" if name.endswith("parquet") else "json"
    for k, content in enumerate(shards):
        path = folder / f"train-{k:05d}-of-00002.{fmt}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif fmt == "parquet":
            pq.write_table(pa.table({"text": pa.array(content, pa.string())}), path)
        else:
            path.write_text("".join(json.dumps(row) + "\n" for row in content))
    return fmt, str(folder / f"train-*.{fmt}")


def _bad_stream(tmp_path, name, shards, world=1, **kw):
    fmt, files = _bad(tmp_path, name, shards)
    return StreamingBatches(f"hf:{fmt}", "byte", SEQ, MICRO, world=world, data_files=files, workers=0,
                            val_documents=0, shuffle_buffer=1, **kw)


def test_corrupt_shards_get_errors_naming_them(tmp_path):
    with pytest.raises(ValueError, match=r"train-00001-of-00002.parquet is not a readable parquet file"):
        _bad_stream(tmp_path, "corrupt-parquet", [DOCS[:10], b"PAR1 this is not parquet"])
    stream = _bad_stream(tmp_path, "corrupt-json", [[{"text": d} for d in DOCS[:10]], b'{"text": "a"}\n{"text": "b"\n'])
    with pytest.raises(RuntimeError, match=r"stream 1 of hf:json \(.*train-00001-of-00002.json\): reading failed"):
        _read([stream], 20)


def test_empty_shards_are_counted_skips(tmp_path):
    rows = [{"text": d} for d in DOCS[:30]]
    stream = _bad_stream(tmp_path, "empty-json", [rows, b""])
    assert stream.num_streams == 1 and stream.stats()["skipped_files"][0].endswith("train-00001-of-00002.json")
    assert _docs_of(_stream_tokens(_windows(_read([stream], 15))))[:30] == DOCS[:30]
    stream = _bad_stream(tmp_path, "empty-parquet", [DOCS[:30], []])
    assert len(stream.stats()["skipped_files"]) == 1
    assert _docs_of(_stream_tokens(_windows(_read([stream], 15))))[:30] == DOCS[:30]
    # A shard of blank documents is an empty stream: skipped, counted, the other streams go on.
    stream = _bad_stream(tmp_path, "blank-json", [rows, [{"text": ""}] * 5], streams=2)
    assert _docs_of(_stream_tokens(_windows(_read([stream], 15))))[:30] == DOCS[:30]
    assert stream.stats()["empty_streams"] == [1] and stream.stats()["skipped_empty_rows"] == 5
    with pytest.raises(ValueError, match="none of its streams"):
        _read([_bad_stream(tmp_path, "all-blank-json", [[{"text": ""}], [{"text": ""}]])], 1)


def test_missing_and_non_text_columns(tmp_path):
    with pytest.raises(KeyError, match=r"no column 'text' \(columns: \['body'\]\)"):
        _bad_stream(tmp_path, "no-text-json", [[{"body": "a"}], [{"body": "b"}]])
    (tmp_path / "int-parquet").mkdir()
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "int-parquet" / "train.parquet")
    files = str(tmp_path / "int-parquet" / "*.parquet")
    with pytest.raises(ValueError, match="holds int64 values, not text"):
        StreamingBatches("hf:parquet", "byte", 8, 2, data_files=files, workers=0, val_documents=0)
    odd = [{"text": DOCS[0]}, {"text": None}, {"text": 5}, {"text": ["x"]}, {"text": DOCS[1]}]
    stream = _bad_stream(tmp_path, "odd-json", [odd, [{"text": d} for d in DOCS[2:6]]], streams=1)
    assert _docs_of(_stream_tokens(_windows(_read([stream], 8))))[:6] == DOCS[:6]
    assert stream.stats()["skipped_not_text_rows"] >= 2 and stream.stats()["skipped_empty_rows"] >= 1


def test_bad_arguments(corpus, tmp_path):
    with pytest.raises(ValueError, match="source must be 'hf:NAME'"):
        StreamingBatches("shakespeare", "byte", SEQ, MICRO)
    with pytest.raises(ValueError, match="matches no file"):
        StreamingBatches("hf:json", "byte", SEQ, MICRO, data_files=str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(ValueError, match="set data_files"):
        StreamingBatches("hf:parquet", "byte", SEQ, MICRO)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        StreamingBatches("hf:parquet", "bpe", SEQ, MICRO, data_files=corpus["parquet"])


# ----------------------------------------------------------------------------- run configs


def test_corpus_run_configs():
    from dsmoe.config import load_yaml_tree
    from dsmoe.config.schema import CONFIG_ROOT

    cosmo = load_yaml_tree(CONFIG_ROOT / "runs" / "cosmopedia-smollm2.yaml")
    assert (cosmo["model"]["name"], cosmo["model"]["d_model"], cosmo["model"]["n_layers"]) == ("smollm2-moe-576x30", 576, 30)
    t = cosmo["train"]
    assert (t["beta1"], t["beta2"], t["lr"], t["warmup_steps"], t["weight_decay"], t["grad_clip"], t["precision"],
            t["seq_len"]) == (0.9, 0.95, 3e-3, 2000, 0.01, 1.0, "bf16", 2048)
    assert cosmo["data"]["source"] == "hf:HuggingFaceTB/smollm-corpus" and cosmo["data"]["hf_config"] == "cosmopedia-v2"
    assert cosmo["data"]["streaming"] is True
    wiki = load_yaml_tree(CONFIG_ROOT / "runs" / "wikitext103-moe512.yaml")
    assert wiki["model"]["name"] == "moe-512x8" and wiki["data"]["tokenizer"] == "tiktoken:gpt2"
    assert (wiki["data"]["hf_config"], wiki["data"]["val_split"], wiki["data"]["streaming"]) == \
        ("wikitext-103-raw-v1", "validation", True)
    for tree in (cosmo, wiki):  # the tokenizer fits the embedding
        assert get_tokenizer(tree["data"]["tokenizer"]).vocab_size <= tree["model"]["vocab_size"]
