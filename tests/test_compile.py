"""Regional torch.compile (dsmoe.parallel.wrap.compile_blocks): graph breaks counted by dynamo, losses vs eager.

Graphs are captured with the "eager" and "aot_eager" backends (dynamo's tracing and AOTAutograd's
forward/backward split, as inductor gets them, without code generation: inductor's C++ compile takes
minutes on two cores; benchmarks/compile_speed.py runs inductor and reports its loss difference).
"""
import copy

import pytest
import torch

from dsmoe.config import CONFIG_ROOT, load_config
from dsmoe.infer import generate_ids
from dsmoe.model import Transformer
from dsmoe.parallel.wrap import block_fn_for, compile_blocks
from distributed import run_workers

SMALL = ["--train.seq_len=16", "--model.n_layers=2", "--model.d_model=32", "--model.n_heads=2",
         "--model.ffn_hidden=64", "--moe.expert_hidden=16", "--attention.kv_lora_rank=16",
         "--attention.qk_nope_head_dim=8", "--attention.qk_rope_head_dim=8", "--attention.v_head_dim=8"]
V = 64


def small_model(*overrides, dispatcher_factory=None):
    cfg = load_config(CONFIG_ROOT / "models" / "tiny.yaml", SMALL + list(overrides))  # layer 0 dense, 1 MoE
    torch.manual_seed(0)
    return Transformer(cfg, vocab_size=V, dispatcher_factory=dispatcher_factory)


def batch(gen):
    x = torch.randint(0, V, (2, 16), generator=gen)
    return x, torch.roll(x, -1, 1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_dense_and_moe_blocks_are_one_graph_each_without_breaks():
    model = small_model()
    names = list(model.state_dict())
    compile_blocks(model, backend="eager")
    assert list(model.state_dict()) == names  # checkpoints do not see the compilation
    assert [b.is_moe for b in model.layers] == [False, True]
    x, y = batch(torch.Generator().manual_seed(0))
    model(x, y).loss.backward()
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # one dense block graph, one MoE block graph


def test_compiled_training_equals_eager_over_ten_steps():
    eager = small_model()
    compiled = compile_blocks(copy.deepcopy(eager), backend="aot_eager")

    def losses(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, y = batch(torch.Generator().manual_seed(1))
        out = []
        for _ in range(10):  # one batch again and again: the loss must fall
            loss = model(x, y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    ref, got = losses(eager), losses(compiled)
    assert ref[-1] < ref[0]  # it trains
    assert max(abs(a - b) / abs(b) for a, b in zip(got, ref)) <= 1e-5, (got, ref)
    assert not torch._dynamo.utils.counters["graph_break"]


def test_selective_checkpointing_of_compiled_blocks_equals_eager():
    eager = small_model("--parallel.activation_checkpointing=selective")
    compiled = compile_blocks(copy.deepcopy(eager), backend="aot_eager")
    block_fn = block_fn_for(eager.cfg.parallel)
    x, y = batch(torch.Generator().manual_seed(2))
    for model in (eager, compiled):
        model(x, y, block_fn=block_fn).loss.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no `layers`"):
        compile_blocks(torch.nn.Linear(2, 2))


def _ep_worker(rank, world):
    from dsmoe.parallel.dispatch import AllToAllDispatcher
    from dsmoe.parallel.mesh import init_mesh

    mesh = init_mesh(device="cpu", ep=world)
    model, eager = (small_model(dispatcher_factory=lambda layer: AllToAllDispatcher(8, mesh.ep_group))
                    for _ in range(2))  # equal weights: the same seed
    compile_blocks(model, backend="eager")
    x, y = batch(torch.Generator().manual_seed(10 + rank))  # each rank its own tokens
    got, ref = model(x, y), eager(x, y)
    got.loss.backward()
    ref.loss.backward()
    counters = torch._dynamo.utils.counters
    breaks = dict(counters["graph_break"])
    diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), eager.parameters()))
    return {"breaks": breaks, "loss_diff": abs(got.loss.item() - ref.loss.item()), "grad_diff": diff,
            "graphs": counters["stats"]["unique_graphs"]}


def test_expert_parallel_moe_block_is_compiled_around_its_host_sync():
    """ep 2: the MoE's route (split-size sync, all-to-alls, experts, combine) runs eagerly between the
    block's compiled pieces; no graph breaks inside them."""
    for r in run_workers(_ep_worker, 2):
        assert not r["breaks"], r["breaks"]
        assert r["graphs"] == 5  # dense block; the MoE block's attention sub-layer, norm, router, shared experts
        assert r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-6


def test_a_sample_after_compiled_training_steps_compiles_nothing():
    """Cached generation reads block.layer and passes its own attention closure: a compiled block would
    recompile per layer. It runs the eager functions instead, and the compiled ones stay for training."""
    model = compile_blocks(small_model(), backend="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch(torch.Generator().manual_seed(3))
    for _ in range(2):
        model(x, y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    counters = torch._dynamo.utils.counters
    frames = counters["stats"]["calls_captured"]
    compiled_forward = model.layers[0].forward
    model.eval()
    with torch.no_grad():
        out = generate_ids(model, x[:1, :5], 6, temperature=0.0)
    assert out.shape == (1, 11)
    assert counters["stats"]["calls_captured"] == frames and not counters["recompiles"], dict(counters)
    assert model.layers[0].forward is compiled_forward  # training keeps its compiled blocks
    model.train()
    model(x, y).loss.backward()
    assert not counters["recompiles"], dict(counters["recompiles"])
