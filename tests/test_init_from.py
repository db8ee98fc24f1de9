"""Fine-tuning from weights made elsewhere: `--init-from-hf DIR` (a transformers directory) and
`--init-from CKPT` start a fresh run whose first weights are exactly the source's, in any layout."""
import os

import pytest
import torch

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from cli import REPO, run, small_args  # noqa: E402
from conftest import small_config  # noqa: E402
from distributed import run_workers  # noqa: E402
from dsmoe.export import export_model  # noqa: E402
from dsmoe.checkpoint.file import CheckpointError  # noqa: E402
from dsmoe.model import Transformer  # noqa: E402
from dsmoe.train.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, data_cache):
    """A dsmoe model of the test shape (other seed, a trained-like bias) written as a transformers directory."""
    out = tmp_path_factory.mktemp("hf") / "model"
    cfg = small_config(out.parent / "unused", data_cache, "--train.seed=99", "--model.vocab_size=320")
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for moe in model.moe_modules():
            moe.router.expert_bias.normal_(0.0, 0.5)
    export_model(model, "byte", out)
    return out, {k: v.clone() for k, v in model.state_dict().items()}


def initial_state(rank, world, run_dir, cache, source, overrides):
    t = Trainer(small_config(run_dir, cache, *overrides), init_from=str(source))
    return t.checkpoints.full_state()["model"]  # whole tensors on rank 0 (every rank takes part)


@pytest.mark.parametrize("world, overrides", [(1, []), (2, ["--parallel.ep=2"]), (2, ["--parallel.dp=fsdp"])])
def test_init_from_hf_gives_the_sources_weights_in_every_layout(tmp_path, data_cache, hf_dir, world, overrides):
    source, expected = hf_dir
    args = (tmp_path / "run", data_cache, source, overrides)
    got = initial_state(0, 1, *args) if world == 1 else run_workers(initial_state, world, args)[0]
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_init_from_a_checkpoint_and_from_the_command_line(tmp_path, data_cache, hf_dir):
    source, expected = hf_dir
    trained = Trainer(small_config(tmp_path / "a", data_cache, "--train.steps=2"), init_from=str(source))
    trained.fit()
    ckpt = next((tmp_path / "a" / "checkpoints").iterdir())
    again = Trainer(small_config(tmp_path / "b", data_cache), init_from=str(ckpt))
    assert again.progress.step == 0 and torch.equal(again.model.tok_embeddings.weight,
                                                    trained.model.tok_embeddings.weight)
    with pytest.raises(CheckpointError, match="tok_embeddings.weight: checkpoint .320, 64. vs model .320, 96."):
        Trainer(small_config(tmp_path / "c", data_cache, "--model.d_model=96"), init_from=str(ckpt))
    out = run(["python", str(REPO / "launch" / "train.py"), "--init-from-hf", str(source),
               *[a for a in small_args(tmp_path / "d", data_cache) if not a.startswith(("--model.", "--attention.",
                                                                                        "--moe."))],
               "--train.steps=1"])
    assert out.returncode == 0, out.stderr
    assert f"initialised from {source}" in out.stdout
