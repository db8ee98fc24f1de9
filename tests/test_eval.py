"""python -m dsmoe.eval: the held-out loss training logged for the same checkpoint, and the expert load."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, small_config
from dsmoe.eval import evaluate_checkpoint, main
from dsmoe.model.moe import Router
from dsmoe.checkpoint.load import load_model
from dsmoe.train.trainer import Trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("eval-run")
    Trainer(small_config(run, data_cache, "--train.steps=4", "--train.eval_every=2", "--train.eval_batches=3")).fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["val_loss"] for r in rows if r.get("step") == 4 and "val_loss" in r]
    assert len(logged) == 1
    return run, logged[0]


def test_eval_loss_equals_the_trainers_logged_val_loss(trained_run):
    run, logged = trained_run
    result = evaluate_checkpoint("auto", str(run), device="cpu")
    assert result["val_loss"] == logged and result["batches"] == 3
    out = subprocess.run([sys.executable, "-m", "dsmoe.eval", "--ckpt", "auto", "--run-dir", str(run), "--json"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["val_loss"] == logged


def test_expert_load_counts_every_routed_assignment(trained_run):
    """The shares equal counts taken independently from the routers' choices on the same batches."""
    run, _ = trained_run
    result = evaluate_checkpoint("auto", str(run), batches=2, device="cpu")
    model, _, cfg = load_model("auto", str(run), device="cpu")
    seen = {}

    def count(module, _inputs, routing):
        seen[module] = seen.get(module, 0) + torch.bincount(routing.topk_idx.flatten(), minlength=module.n_experts)

    for moe in model.moe_modules():
        moe.router.register_forward_hook(count)
    from dsmoe.data import ensure_prepared, load_prepared, val_batches

    d, t = cfg.data, cfg.train
    _, _, val = load_prepared(ensure_prepared(d.source, d.tokenizer, cache_root=d.cache_dir, val_fraction=d.val_fraction))
    with torch.no_grad():
        for x, _ in val_batches(val, t.seq_len, t.micro_batch, 2):
            model(x)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    expected = [(seen[r] / seen[r].sum()).tolist() for r in routers]
    assert result["moe_layers"] == model.moe_layer_ids and len(expected) == len(result["expert_load"]) > 0
    for got, want in zip(result["expert_load"], expected):
        assert got == pytest.approx(want, abs=1e-7)
    E = cfg.moe.n_routed_experts
    assert result["expert_imbalance"] == pytest.approx([max(s) * E for s in result["expert_load"]], rel=1e-6)


def test_eval_errors_are_clear(tmp_path, trained_run, capsys):
    assert main(["--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    run, _ = trained_run
    assert main(["--ckpt", "auto", "--run-dir", str(run), "--batches", "0"]) == 2
    assert "n_batches must be positive" in capsys.readouterr().err


def test_auto_names_its_checkpoint_and_an_imported_export_evaluates_the_same(trained_run, tmp_path, capsys):
    """`--ckpt auto` says which checkpoint it took; exported then imported, the same weights evaluate
    the same windows and give the same number."""
    from dsmoe.export import export_checkpoint, import_hf
    from dsmoe.checkpoint.file import latest_checkpoint

    run, _ = trained_run
    assert main(["--ckpt", "auto", "--run-dir", str(run), "--json"]) == 0
    captured = capsys.readouterr()
    assert f"checkpoint: {latest_checkpoint(run)} (the newest in {run})" in captured.err
    native = json.loads(captured.out)
    export_checkpoint("auto", str(run), tmp_path / "hf")
    imported = evaluate_checkpoint(str(import_hf(tmp_path / "hf", tmp_path / "imported.pt")), device="cpu")
    assert imported["tokens"] == native["tokens"] == 3 * 4 * 32 and imported["batches"] == native["batches"]
    assert imported["val_loss"] == pytest.approx(native["val_loss"], abs=1e-6)
