"""Training on a streamed dataset in the Hugging Face layout (parquet shards the test writes, read
through `datasets` as a hub dataset would be): 8 steps straight equal 4 + resume + 4, at world 1 and 2,
and the two corpus run files load their data sections."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_config
from distributed import run_workers
from dsmoe.config import CONFIG_ROOT, load_config
from dsmoe.train.trainer import Trainer


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-parquet") / "data"
    folder.mkdir()
    words = "the king and queen of verona spoke at night under the moon".split()
    for k in range(4):
        docs = [" ".join(words[(i * 7 + k) % len(words):] + words[: (i * 3 + k) % len(words)]) * 3 for i in range(60)]
        pq.write_table(pa.table({"text": docs}), folder / f"train-{k:05d}-of-00004.parquet", row_group_size=16)
    return str(folder / "train-*.parquet")


def stream_args(glob, *extra):
    return ["--data.source=hf:parquet", f"--data.hf_data_files={glob}", "--data.workers=0",
            "--data.shuffle_buffer=8", "--data.val_documents=8", "--train.eval_every=4", "--train.eval_batches=2",
            "--train.micro_batch=2", *extra]


def losses(history):
    return {r["step"]: r["loss"] for r in history if "loss" in r}


def stream_worker(rank, world, run_dir, cache, glob, overrides, resume):
    t = Trainer(small_config(run_dir, cache, *stream_args(glob, *overrides)), resume=resume)
    return {"losses": losses(t.fit()["history"]), "samples": t.progress.samples}


@pytest.mark.parametrize("world", [1, 2])
def test_stream_resume_equals_uninterrupted(tmp_path, data_cache, parquet_corpus, world):
    def train(run_dir, overrides, resume=None):
        args = (run_dir, data_cache, parquet_corpus, overrides, resume)
        return stream_worker(0, 1, *args) if world == 1 else run_workers(stream_worker, world, args)[0]

    full = train(tmp_path / "full", ["--train.steps=8"])
    first = train(tmp_path / "split", ["--train.steps=8", "--train.stop_after=4"])
    second = train(tmp_path / "split", ["--train.steps=8"], resume="auto")
    assert {**first["losses"], **second["losses"]} == full["losses"]
    assert second["samples"] == full["samples"] == 8 * world * 2 * 2


def test_corpus_run_files_stream_their_sources():
    for name, source in (("cosmopedia-smollm2", "hf:HuggingFaceTB/smollm-corpus"),
                         ("wikitext103-moe512", "hf:Salesforce/wikitext")):
        cfg = load_config(CONFIG_ROOT / "runs" / f"{name}.yaml")
        assert cfg.data.source == source and cfg.data.streaming and cfg.data.tokenizer == "tiktoken:gpt2"
