"""A resume reads the files its checkpoint was trained on, or says which changed; a stream never spins on
a position that no longer exists; a local file that cannot be decoded is named with its line."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_config
from dsmoe.data import StreamingBatches, iter_local_documents
from dsmoe.data.sources import DataError
from dsmoe.checkpoint.file import CheckpointError
from dsmoe.train.trainer import Trainer
from test_streaming import DOCS, _write


def shard(path, docs):
    pq.write_table(pa.table({"text": docs}), path, row_group_size=8)


def stream_config(run_dir, cache, glob, *extra):
    return small_config(run_dir, cache, "--data.source=hf:parquet", f"--data.hf_data_files={glob}",
                        "--data.workers=0", "--data.shuffle_buffer=4", "--data.val_documents=0",
                        "--train.micro_batch=2", "--train.grad_accum=1", "--train.steps=4", "--train.stop_after=2",
                        *extra)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("change", ["added", "removed", "changed"])
def test_a_resume_over_changed_shards_is_refused_naming_them(tmp_path, data_cache, change):
    folder = tmp_path / "data"
    glob = _write(folder, [DOCS[k::4] for k in range(4)], "parquet")
    d = tmp_path / "run"
    Trainer(stream_config(d, data_cache, glob)).fit()
    name = {"added": "train-00009-of-00004.parquet", "removed": "train-00003-of-00004.parquet",
            "changed": "train-00001-of-00004.parquet"}[change]
    if change == "added":
        shard(folder / name, DOCS[:20])
    elif change == "removed":
        (folder / name).unlink()
    else:  # replaced under the same name: other documents
        shard(folder / name, [doc.upper() for doc in DOCS[1::4]])
    with pytest.raises(CheckpointError) as e:
        Trainer(stream_config(d, data_cache, glob, "--train.stop_after=4"), resume="auto")
    message = str(e.value)
    assert f"{change}: {folder / name}" in message and "--run.allow_data_change=true" in message
    # accepted on request: the run goes on (or stops with an error naming the stream), never spins
    t = Trainer(stream_config(d, data_cache, glob, "--train.stop_after=4", "--run.allow_data_change=true"),
                resume="auto")
    try:
        assert t.fit()["step"] == 4
    except DataError as error:
        assert "stream" in str(error) and "past that document's end" in str(error)


def test_a_stream_position_past_its_document_is_an_error_naming_the_stream(tmp_path):
    files = _write(tmp_path / "data", [DOCS[k::4] for k in range(4)], "parquet")
    options = dict(seed=7, shuffle_buffer=6, workers=0, val_documents=0, data_files=files)
    with StreamingBatches("hf:parquet", "byte", 16, 2, **options) as stream:
        next(stream)
        state = stream.state_dict()
    state["streams"][0]["offset"] = 10**6  # as if the document under the saved position were shorter now
    with StreamingBatches("hf:parquet", "byte", 16, 2, **options) as stream:
        stream.load_state_dict(state)
        with pytest.raises(DataError, match=r"stream 0 of hf:parquet \(.*train-00000-of-00004.parquet.*past that "
                                            r"document's end"):
            for _ in range(8):
                next(stream)


def test_a_replaced_local_file_is_refused_too(tmp_path, data_cache):
    """Prepared (non-streaming) local sources: the files under data.source are fingerprinted the same way."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(DOCS) * 4)
    (corpus / "b.txt").write_text("second file " * 200)
    d = tmp_path / "run"
    args = (f"--data.source={corpus}", "--train.steps=4", "--train.stop_after=2")
    Trainer(small_config(d, data_cache, *args)).fit()
    (corpus / "b.txt").write_text("other text " * 300)
    with pytest.raises(CheckpointError, match=r"changed: .*b.txt \(2400 -> 3300 bytes\)"):
        Trainer(small_config(d, data_cache, *args), resume="auto")


def test_local_decode_errors_name_the_file_and_line(tmp_path):
    bad_json = tmp_path / "docs.jsonl"
    bad_json.write_text('{"text": "one"}\n{"text": "two"}\n{"text": "thr\n')
    with pytest.raises(DataError, match=r"docs.jsonl:3 is not a JSON line .*fix or remove that line"):
        list(iter_local_documents(bad_json))
    latin = tmp_path / "notes.txt"
    latin.write_bytes("first line\nsecond line\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"notes.txt:3 is not UTF-8 text \(byte 0xe9\): re-encode the file as UTF-8"):
        list(iter_local_documents(latin))
    latin_json = tmp_path / "latin.jsonl"
    latin_json.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2 is not UTF-8 text"):
        list(iter_local_documents(latin_json))
