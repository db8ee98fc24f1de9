"""The simulated rehearsal (fake tensors, fake process group) against a real gloo run of the same small
config, and against the analytic estimate."""
import dataclasses

import pytest

from dsmoe.config import CONFIG_ROOT, load_config
from dsmoe.estimate import estimate_rows, main
from dsmoe.metrics.memory import StepMemory
from dsmoe.tools.memory import estimate_memory
from dsmoe.train.simulate import simulate
from dsmoe.train.step import train_step
from distributed import run_workers

# v3-mini's layouts (FSDP2 + ep, and DDP + ep as on h100_multinode) at a width that runs in seconds:
# MLA with a query bottleneck, 8 routed experts in 8 groups + a shared one, the first layer dense,
# every block recomputed, bf16, two micro-steps
SMALL = ["--model.d_model=128", "--model.n_layers=3", "--model.n_heads=4", "--model.ffn_hidden=256",
         "--model.vocab_size=1024", "--model.max_seq_len=128", "--attention.q_lora_rank=96",
         "--attention.kv_lora_rank=64", "--attention.qk_nope_head_dim=32", "--attention.qk_rope_head_dim=16",
         "--attention.v_head_dim=32", "--moe.n_routed_experts=8", "--moe.n_shared_experts=1",
         "--moe.expert_hidden=64", "--moe.n_groups=4", "--moe.topk_groups=2", "--moe.top_k=2",
         "--train.micro_batch=2", "--train.seq_len=64", "--train.grad_accum=2", "--train.device=cpu",
         "--data.tokenizer=byte", "--train.eval_every=0", "--train.sample_every=0", "--log.rich=off"]
LAYOUTS = {"fsdp": CONFIG_ROOT / "runs" / "v3-mini-h100-fsdp.yaml", "ddp": CONFIG_ROOT / "hardware" / "h100_multinode.yaml"}


def _config(dp: str, ep: int, run_dir=None, cache=None):
    extra = [f"--parallel.ep={ep}"] + ([f"--run.dir={run_dir}", f"--data.cache_dir={cache}"] if run_dir else [])
    return load_config(LAYOUTS[dp], SMALL + extra)


def _close(a: float, b: float, rel: float = 0.10, floor: int = 64 * 1024) -> bool:
    """Within `rel` of each other, or both under `floor` bytes (buffers, a few small shards)."""
    return abs(a - b) <= rel * max(a, b) or max(a, b) < floor


def _real_step(rank: int, world: int, dp: str, ep: int, run_dir: str, cache: str) -> dict:
    """Two warm-up steps of the real Trainer (AdamW's state exists after the first, DDP rebuilds its
    buckets in the second), then a third through the same function the simulation runs, measured by
    the same tracker on real tensors."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from dsmoe.train.trainer import Trainer

    cfg = _config(dp, ep, f"{run_dir}/{dp}", cache)
    trainer = Trainer(cfg)
    buckets = {}
    if not trainer.fsdp:  # DDP's flat gradient buckets, kept for the memory tracker

        def hook(state, bucket):
            buckets[bucket.index()] = bucket.buffer()
            return allreduce_hook(state, bucket)

        trainer.wrapped.register_comm_hook(None, hook)
    trainer.train_step()
    trainer.train_step()
    # the step the trainer's loop runs (guard included), with the tracker told of each micro-step
    with StepMemory(trainer.model, trainer.optimizer, trainer.fsdp, gradients=tuple(buckets.values())) as memory:
        train_step(trainer.state, trainer.progress, trainer._batches(), trainer.guard, cfg, policy=trainer.policy,
                   on_micro_step=memory.micro_step_done)
    return memory.peak()


@pytest.mark.parametrize("dp", ["fsdp", "ddp"])
def test_simulated_step_matches_a_real_gloo_run(dp, tmp_path, data_cache):
    world, ep = 2, 2
    sim = simulate(_config(dp, ep), world)
    real = run_workers(_real_step, world, args=(dp, ep, str(tmp_path), data_cache))[0]  # rank 0, as simulated
    print(f"{dp}: simulated {sim['peak']}\n{dp}: real      {real}")
    assert sim["dp"] == dp and sim["world"] == world and sim["ep"] == ep
    for key in StepMemory.CATEGORIES + ("total",):
        assert _close(sim["peak"][key], real[key]), (key, sim["peak"][key], real[key])
    assert sim["peak"]["total"] > sim["peak"]["activations"] > 0


@pytest.mark.parametrize("dp", ["fsdp", "ddp"])
def test_simulated_world_8_step_agrees_with_the_estimate(dp):
    cfg = _config(dp, 8)
    sim = simulate(cfg, 8)
    est = estimate_rows(estimate_memory(cfg, world=8, device="cpu"))
    print(f"{dp}: simulated {sim['peak']}\n{dp}: estimate  {est}")
    for key in ("parameters", "optimizer"):  # at the peak both hold their whole shard
        assert _close(sim["peak"][key], est[key], rel=0.02), key
    # FSDP2 keeps every unit's fp32 gradient unsharded between micro-steps; DDP's buckets hold them all
    assert _close(sim["peak"]["gradients"], est["gradients"], rel=0.02)
    assert _close(sim["peak"]["total"], est["total"]), (sim["peak"]["total"], est["total"])
    plan = sim["checkpoint"]
    assert 0 < plan["rank_bytes"] < plan["whole_bytes"]
    assert any("balanced routing" in a for a in sim["assumptions"])


def test_layouts_the_trainer_refuses_get_their_error():
    cfg = _config("fsdp", 2)
    with pytest.raises(ValueError, match="not a positive multiple of ep=2"):
        simulate(cfg, 3)
    with pytest.raises(ValueError, match="not divisible by ep=3"):
        simulate(cfg, 6, ep=3)
    with pytest.raises(ValueError, match="cpu_offload"):
        simulate(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, cpu_offload=True)), 2)


def test_cli_prints_the_simulated_table_and_a_verdict(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rc = main([str(LAYOUTS["ddp"]), "--simulate", "--world", "8", "--parallel.ep", "8", "--gpu-mem-gb", "1", *SMALL])
    out = capsys.readouterr().out
    assert rc == 0 and "simulated step, rank 0 of world 8 (DDP, ep 8)" in out and "fits:" in out
    for line in ("parameters", "gradients", "optimizer", "activations", "peak", "assumed: balanced routing"):
        assert line in out
