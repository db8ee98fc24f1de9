"""Config loading, composition, overrides and the errors bad configs get."""
import subprocess
import sys

import pytest

from dsmoe.config import CONFIG_ROOT, ConfigError, load_config, parse_overrides

TINY = CONFIG_ROOT / "models" / "tiny.yaml"


def test_preset_file_and_overrides_compose(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("preset: tiny\nmoe: {top_k: 3}\ntrain: {steps: 7}\n")
    cfg = load_config(run, ["--train.steps=9", "--train.lr", "0.01", "--moe.capacity_factor=1.5"])
    assert cfg.model.name == "tiny" and cfg.model.d_model == 128  # from the preset
    assert cfg.moe.top_k == 3  # the run file overrides the preset
    assert cfg.train.steps == 9  # the command line overrides the run file
    assert cfg.train.lr == 0.01 and cfg.moe.capacity_factor == 1.5


def test_list_and_null_overrides():
    cfg = load_config(TINY, ["--moe.moe_layers=[1,3]", "--moe.capacity_factor=null"])
    assert cfg.moe.moe_layers == [1, 3] and cfg.moe.capacity_factor is None
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]


@pytest.mark.parametrize("overrides, message", [
    (["--moe.top_kk=2"], "Did you mean 'top_k'"),
    (["--trian.steps=2"], "Did you mean 'train'"),
    (["--train.steps=many"], "train.steps: expected an integer"),
    (["--model.tie_embeddings=maybe"], "expected true or false"),
    (["--attention.kind=mha"], "not one of"),
    (["--attention.kind=gqa", "--model.d_model=130"], "not divisible by model.n_heads"),
    (["--attention.kind=gqa", "--attention.n_kv_heads=3"], "must divide model.n_heads"),
    (["--moe.top_k=9"], "moe.top_k=9 must be between 1 and moe.n_routed_experts=8"),
    (["--moe.n_groups=3"], "moe.n_groups=3 must divide"),
    (["--moe.moe_layers=[1,7]"], "[7] are outside the model's layers 0..3"),
    (["--moe.capacity_factor=0"], "capacity_factor must be positive"),
    (["--moe.capacity_factor=-1"], "capacity_factor must be positive"),
    (["--parallel.ep=3"], "not divisible by parallel.ep=3"),
    (["--train.seq_len=4096"], "raise model.max_seq_len"),
    (["steps=3"], "overrides look like --section.field=value"),
])
def test_bad_configs_name_the_field_and_fix(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value)


def test_unknown_preset_and_missing_file(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("preset: tinny\n")
    with pytest.raises(ConfigError, match="Did you mean 'tiny'"):
        load_config(run)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_parse_overrides_both_forms():
    assert parse_overrides(["--a.b=1", "--c.d", "x"]) == {"a": {"b": 1}, "c": {"d": "x"}}


def test_params_command_runs_on_a_big_preset():
    out = subprocess.run([sys.executable, "-m", "dsmoe.params", str(CONFIG_ROOT / "models" / "v3-mini.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "5,708,990,464" in out.stdout and "moe_routed" in out.stdout


def test_a_union_field_takes_words_and_uris():
    """log.mlflow is Literal["off", "on"] or a URI: YAML's on/off (booleans) stay words, a URI stays itself."""
    for given, want in (("on", "on"), ("off", "off"), ("true", "on"), ("sqlite:///m.db", "sqlite:///m.db")):
        assert load_config(None, [f"--log.mlflow={given}"]).log.mlflow == want


@pytest.mark.parametrize("override, message", [
    ("--train.lr=inf", "train.lr=inf must be a finite number > 0"),
    ("--train.lr=nan", "train.lr=nan must be a finite number > 0"),
    ("--train.lr=-0.001", "train.lr=-0.001 must be a finite number > 0"),
    ("--train.min_lr_ratio=1.5", "0 <= train.min_lr_ratio <= 1"),
    ("--train.grad_clip=-1", "train.grad_clip=-1.0 must be a finite number >= 0: 0 turns clipping off"),
    ("--train.weight_decay=nan", "train.weight_decay=nan must be a finite number >= 0"),
    ("--train.eps=0", "train.eps=0.0 must be a finite number > 0"),
    ("--train.beta2=1", "train.beta2=1.0 must be in [0, 1)"),
    ("--checkpoint.every=-5", "checkpoint.every=-5 must be >= 0 (steps between them; 0 = off)"),
    ("--train.eval_every=-1", "train.eval_every=-1 must be >= 0"),
    ("--train.sample_every=-1", "train.sample_every=-1 must be >= 0"),
    ("--train.log_every=0", "train.log_every=0 must be >= 1"),
    ("--train.stop_after=0", "train.stop_after=0 must be >= 1 or null"),
    ("--train.temperature=-1", "train.temperature=-1.0 must be a finite number >= 0: 0 samples greedily"),
    ("--model.norm_eps=0", "model.norm_eps=0.0 must be a finite number > 0"),
    ("--moe.z_loss_coef=-1", "moe.z_loss_coef=-1.0 must be a finite number >= 0: 0 turns it off"),
    ("--guard.spike_zscore=inf", "guard.spike_zscore=inf must be a finite number >= 0"),
    ("--data.shuffle_buffer=0", "data.shuffle_buffer must be >= 1"),
    ("--data.streams=0", "data.streams=0 must be >= 1 or null"),
    ("--log.peak_tflops=-5", "log.peak_tflops=-5.0 must be a finite number > 0"),
])
def test_out_of_range_numbers_are_refused_at_load_naming_the_field_and_fix(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_ROOT / "runs" / "tiny-shakespeare.yaml", [override])
    assert message in str(e.value)


def test_dry_run_refuses_an_infinite_learning_rate_with_exit_2(tmp_path):
    from conftest import REPO

    out = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--dry-run", "--train.lr=inf",
                          f"--run.dir={tmp_path / 'r'}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "train.lr=inf must be a finite number > 0" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "r").exists()


def test_a_sample_longer_than_the_context_is_refused_by_the_trainer_and_the_dry_run(tmp_path):
    """Sampling is training's: a model-only config loads, the trainer and --dry-run refuse it first."""
    from conftest import REPO

    from dsmoe.train.trainer import Trainer

    cfg = load_config(CONFIG_ROOT / "runs" / "tiny-shakespeare.yaml",
                      ["--train.sample_tokens=300", f"--run.dir={tmp_path / 'r'}"])
    message = "train.sample_tokens=300 leaves no room for a prompt in model.max_seq_len=256: lower it below 256"
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg)
    out = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--dry-run", "--train.sample_tokens=300",
                          f"--run.dir={tmp_path / 'r'}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()
