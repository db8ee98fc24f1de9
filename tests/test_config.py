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
