"""Guard pieces without the trainer: spikes, rollback counting, localisation, checksums."""
import pytest
import torch

from conftest import small_config
from dsmoe.config import GuardConfig
from dsmoe.model import Transformer
from dsmoe.checkpoint.file import CheckpointError, load_checkpoint, save_checkpoint
from dsmoe.train.faults import FaultInjector
from dsmoe.train.guard import Guard, SpikeDetector, localize


def test_spike_zscore_against_the_window():
    d = SpikeDetector(window=5, threshold=4.0)
    for x in [2.0, 2.1, 1.9, 2.0, 2.05]:
        assert d.zscore(x) is None or abs(d.zscore(x)) < 4
        d.accept(x)
    assert d.zscore(2.02) < 1
    assert d.zscore(5.0) > 20


def test_guard_flags_nonfinite_and_spikes_single_process():
    g = Guard(GuardConfig(spike_zscore=5.0, spike_window=4))
    ok = g.check(torch.tensor(2.0), torch.tensor(1.0), None)
    assert not ok.bad
    bad = g.check(torch.tensor(float("nan")), torch.tensor(1.0), None)
    assert bad.bad and bad.what == ["loss"] and bad.ranks == [0]
    bad = g.check(torch.tensor(2.0), torch.tensor(float("inf")))
    assert bad.what == ["grad_norm"] and bad.ranks == [] and not bad.overflow
    # fp16: an inf gradient with GradScaler's flag set is an overflow (skipped), not a guard event
    other = Guard(GuardConfig())
    overflow = other.check(torch.tensor(2.0), torch.tensor(float("inf")), found_inf=torch.tensor(1.0))
    assert not overflow.bad and overflow.overflow
    counts, dropped = torch.tensor([[3.0, 1.0], [2.0, 2.0]]), torch.tensor([0.0, 1.0])
    carried = other.check(torch.tensor(2.0), torch.tensor(1.0), stop=True, counts=counts, dropped=dropped)
    assert carried.stop and torch.equal(carried.counts, counts) and torch.equal(carried.dropped, dropped)
    for x in (2.0, 2.1, 1.9):
        assert not g.check(torch.tensor(x), torch.tensor(1.0), None).bad
    spike = g.check(torch.tensor(9.0), torch.tensor(1.0), None)
    assert spike.what == ["spike"] and spike.zscore > 5


def test_rollback_threshold_counts_within_the_window():
    g = Guard(GuardConfig(rollback_after=3, rollback_window=10))
    assert not g.record_bad(1) and not g.record_bad(5)
    assert not g.record_bad(12)  # step 1 fell out of the window
    assert g.record_bad(13)


def test_localisation_names_the_injected_module(tmp_path, data_cache):
    cfg = small_config(tmp_path, data_cache, "--faults.nan_step=1", "--faults.nan_module=layers.1.ffn.experts")
    model = Transformer(cfg, 320)
    inj = FaultInjector(cfg.faults, 0, tmp_path)
    inj.attach(model)
    inj.step = 1
    x = torch.randint(0, 320, (2, 32))
    report = localize(model, lambda: model(x, x).loss, step=1, rank=0)
    assert report["module"] == "layers.1.ffn.experts" and report["phase"] == "forward"
    assert report["output"]["nan"] > 0
    inj.step = 2
    assert localize(model, lambda: model(x, x).loss, step=2, rank=0) is None
    with pytest.raises(ValueError, match="not a module path"):
        FaultInjector(small_config(tmp_path, data_cache, "--faults.nan_step=1",
                                   "--faults.nan_module=layers.9.nope").faults, 0, tmp_path).attach(model)


def test_checksum_catches_silent_corruption(tmp_path):
    path = save_checkpoint({"model": {"w": torch.ones(3)}, "progress": {"step": 1}}, tmp_path / "c.pt")
    assert load_checkpoint(path)["progress"]["step"] == 1
    state = torch.load(path, weights_only=True)
    state["model"]["w"][1] = 7.0  # a flipped value the zip container does not notice
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="fails verification"):
        load_checkpoint(path)
