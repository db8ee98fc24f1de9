"""Hugging Face export and import: exported logits and greedy generations equal dsmoe's, tokenizer ids equal,
import then export reproduces a transformers checkpoint's tensors, and what cannot be exact is refused."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
os.environ["HF_HUB_OFFLINE"] = "1"

from conftest import REPO, small_config  # noqa: E402
from dsmoe.config import CONFIG_ROOT, load_config  # noqa: E402
from dsmoe.data import get_tokenizer  # noqa: E402
from dsmoe.export import export_checkpoint, export_model, import_hf  # noqa: E402
from dsmoe.infer import SamplingParams, generate  # noqa: E402
from dsmoe.interop.hf_config import ExportError, config_from_hf  # noqa: E402
from dsmoe.interop.hf_weights import read_safetensors  # noqa: E402
from dsmoe.interop.tokenizer_files import write_tokenizer_files  # noqa: E402
from dsmoe.model import Transformer  # noqa: E402
from dsmoe.checkpoint.file import load_checkpoint  # noqa: E402
from dsmoe.checkpoint.load import load_model  # noqa: E402

SMALL = ["--model.d_model=64", "--model.ffn_hidden=96", "--model.vocab_size=320", "--model.max_seq_len=64",
         "--model.init_std=0.1", "--moe.expert_hidden=32", "--train.seq_len=32", "--data.tokenizer=byte"]
MLA_SMALL = ["--attention.kv_lora_rank=32", "--attention.qk_nope_head_dim=16", "--attention.qk_rope_head_dim=8",
             "--attention.v_head_dim=16"]
# every preset at small size, its structure kept (attention kind, router, experts, groups, MoE placement, ties)
SHAPES = {
    "tiny": ("tiny", ["--model.n_layers=3", "--model.n_heads=2"]),
    "moe-512x8": ("moe-512x8", ["--model.n_layers=4", "--model.n_heads=4", "--moe.moe_layers=[1,3]"]),
    "smollm2-moe-576x30": ("smollm2-moe-576x30", ["--model.n_layers=2", "--model.n_heads=3"] + MLA_SMALL),
    "smollm2-135m-moe": ("smollm2-135m-moe", ["--model.n_layers=2", "--model.n_heads=3"] + MLA_SMALL),
    "v3-tiny": ("v3-tiny", ["--model.n_layers=3", "--model.n_heads=4", "--attention.q_lora_rank=48"] + MLA_SMALL),
    "v3-mini": ("v3-mini", ["--model.n_layers=3", "--model.n_heads=4", "--attention.q_lora_rank=48",
                            "--moe.n_routed_experts=16"] + MLA_SMALL),
    "gqa-sigmoid": ("tiny", ["--model.n_layers=3", "--model.n_heads=4", "--attention.kind=gqa",
                             "--attention.n_kv_heads=1", "--moe.n_groups=2", "--moe.topk_groups=1"]),
    "mla-softmax": ("tiny", ["--model.n_layers=3", "--model.n_heads=2", "--moe.score_func=softmax",
                             "--moe.norm_topk_prob=false", "--moe.routed_scaling_factor=1.5"]),
}
ARCH = {"tiny": "DeepseekV3", "moe-512x8": "Qwen2Moe", "smollm2-moe-576x30": "DeepseekV3",
        "smollm2-135m-moe": "DeepseekV3", "v3-tiny": "DeepseekV3", "v3-mini": "DeepseekV3",
        "gqa-sigmoid": "Glm4Moe", "mla-softmax": "DeepseekV2"}
TEXTS = ["ROMEO: But soft, what light through yonder window breaks?", "  two  spaces\n\n\ttab\r\nCRLF",
         "naïve café — 東京, Ünïcödé, emoji 🤖🏳️‍🌈, math ∑∫√", "<|endoftext|> is text here; <|fim_prefix|> too",
         "it's 12345678 numbers'll 'VE", "\x00\x07 control \u200b zero-width \ufeff", ""]


def build(shape: str, *extra: str) -> Transformer:
    preset, overrides = SHAPES[shape]
    cfg = load_config(CONFIG_ROOT / "models" / f"{preset}.yaml", SMALL + overrides + list(extra))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    if cfg.moe.score_func == "sigmoid":  # a trained-like routing bias that changes which experts win
        with torch.no_grad():
            for moe in model.moe_modules():
                moe.router.expert_bias.normal_(0.0, 0.5)
    return model


def load_hf(out_dir):
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(str(out_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_exported_logits_equal_dsmoe(shape, tmp_path):
    model = build(shape)
    info = export_model(model, "byte", tmp_path / "hf", max_shard_size="150KB" if shape == "v3-mini" else "5GB")
    assert info["architecture"] == f"{ARCH[shape]}ForCausalLM"
    hf = load_hf(tmp_path / "hf")
    assert hf.config.vocab_size == model.vocab_size == 320  # the embedding's rows, padding included
    if shape == "v3-mini":  # sharded, with the index transformers reads
        index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    x = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("shape", ["tiny", "moe-512x8"])
def test_generate_greedy_equals_dsmoe_cached_generation(shape, tmp_path):
    model = build(shape)
    export_model(model, "byte", tmp_path / "hf")
    hf = load_hf(tmp_path / "hf")
    tok = get_tokenizer("byte")
    prompts = [tok.encode("ROMEO:"), tok.encode("But soft, what light")]
    n = 24
    ours = generate(model, prompts, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True), tokenizer=tok)
    for prompt, seq in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
        assert out == seq.out[:len(out)]  # transformers stops at end-of-text: up to there, token for token
        assert len(out) == n or out[-1] == tok.eot_id
        assert all(t < tok.vocab_size for t in out)  # padding ids suppressed (generation_config.json)


def test_tokenizer_files_encode_like_dsmoe(tmp_path):
    from transformers import AutoTokenizer

    for name in ("byte", "tiktoken:gpt2", "tiktoken:cl100k_base"):
        ours = get_tokenizer(name)
        out = tmp_path / name.replace(":", "_")
        write_tokenizer_files(name, out, 64)
        theirs = AutoTokenizer.from_pretrained(str(out))
        assert theirs.eos_token_id == ours.eot_id
        for text in TEXTS:
            ids = ours.encode(text)
            assert theirs(text)["input_ids"] == ids, (name, text)
            assert theirs.decode(ids) == text


def random_deepseek_v3(path, **kw):
    """A transformers DeepseekV3 checkpoint with random weights (routing bias included), saved locally."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    args = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, n_group=4,
                topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
                qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, routed_scaling_factor=2.5, num_mtp_layers=0,
                max_position_embeddings=64, eos_token_id=256, bos_token_id=None, initializer_range=0.1)
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**{**args, **kw})).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.5)
    hf.save_pretrained(str(path))
    return hf


def test_import_then_export_reproduces_the_checkpoint(tmp_path):
    hf = random_deepseek_v3(tmp_path / "hf")
    write_tokenizer_files("byte", tmp_path / "hf", 64)
    ckpt = import_hf(tmp_path / "hf", tmp_path / "init.pt")  # tokenizer recognised from the files
    state = load_checkpoint(ckpt)
    assert state["weights_only"] and state["data"]["tokenizer"] == "byte"
    model, tok, cfg = load_model(str(ckpt), device="cpu")
    assert (cfg.moe.n_groups, cfg.moe.topk_groups, cfg.moe.top_k, cfg.moe.first_k_dense) == (4, 2, 3, 1)
    x = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() < 1e-5
    export_checkpoint(str(ckpt), ".", tmp_path / "again")
    before, after = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "again")
    assert set(before) == set(after)
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    src = json.loads((tmp_path / "hf" / "config.json").read_text())
    out = json.loads((tmp_path / "again" / "config.json").read_text())
    for key in ("n_group", "topk_group", "q_lora_rank", "first_k_dense_replace", "routed_scaling_factor",
                "norm_topk_prob", "tie_word_embeddings", "rope_interleave", "vocab_size", "rms_norm_eps"):
        assert out[key] == src[key], key


@pytest.mark.parametrize("shape, extra, field", [
    ("moe-512x8", ["--moe.capacity_factor=1.0"], "moe.capacity_factor"),
    ("moe-512x8", ["--moe.n_shared_experts=1"], "moe.n_shared_experts"),
    ("moe-512x8", ["--moe.routed_scaling_factor=2.0"], "moe.routed_scaling_factor"),
    ("tiny", ["--moe.moe_layers=[1]"], "moe.moe_layers"),
    ("tiny", ["--model.norm_eps=1e-5"], "model.norm_eps"),
    ("mla-softmax", ["--moe.norm_topk_prob=true"], "moe.norm_topk_prob"),
    ("mla-softmax", ["--moe.n_groups=2"], "moe.n_groups"),
    ("gqa-sigmoid", ["--moe.n_groups=8", "--moe.topk_groups=4"], "moe.n_groups"),
])
def test_export_refuses_what_it_cannot_compute_exactly(shape, extra, field, tmp_path):
    model = build(shape, *extra)
    with pytest.raises(ExportError, match=field.replace(".", r"\.")):
        export_model(model, "byte", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_trained_bias_without_a_place(tmp_path):
    model = build("moe-512x8")
    model.moe_modules()[0].router.expert_bias[0] = 0.1
    with pytest.raises(ExportError, match=r"moe\.bias_update_rate"):
        export_model(model, "byte", tmp_path / "hf")


def test_dropless_export_equals_dsmoe_inference_routing(tmp_path):
    """--dropless: the transformers model computes the capacity-free model dsmoe's inference runs."""
    model = build("moe-512x8", "--moe.capacity_factor=0.5")
    export_model(model, "byte", tmp_path / "hf", dropless=True)
    free = build("moe-512x8", "--moe.capacity_factor=null")
    free.load_state_dict(model.state_dict())
    x = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (free(x).logits - load_hf(tmp_path / "hf")(x).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("make, field", [
    (lambda: __import__("transformers").LlamaConfig(), "model_type 'llama'"),
    (lambda: __import__("transformers").DeepseekV3Config(rope_interleave=False), "rope_interleave"),
    (lambda: __import__("transformers").DeepseekV3Config(
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                         "original_max_position_embeddings": 4096}), "rope_parameters"),
    (lambda: __import__("transformers").Qwen2MoeConfig(qkv_bias=False), "shared_expert_intermediate_size"),
])
def test_import_refuses_configs_dsmoe_cannot_represent(make, field, tmp_path):
    make().save_pretrained(str(tmp_path))
    with pytest.raises(ExportError, match=field):
        config_from_hf(tmp_path, "byte")


def test_command_line_exports_a_trained_checkpoint(tmp_path, data_cache):
    from dsmoe.train.trainer import Trainer

    run = tmp_path / "run"
    Trainer(small_config(run, data_cache, "--train.steps=2")).fit()
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "dsmoe.export", "--ckpt", "auto", "--run-dir", str(run), "--out", str(out),
           "--max-shard-size", "200KB"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file() and (out / "generation_config.json").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 2 and "not empty" in again.stderr
    model, _, _ = load_model("auto", str(run), device="cpu")
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x).logits - load_hf(out)(x).logits).abs().max().item() < 1e-5


def test_exported_files_suit_transformers_users(tmp_path):
    """Pad token one id everywhere, files 0644, no generation_config field that makes generate() warn, and
    the chat template the server applies."""
    import logging

    from transformers import AutoTokenizer

    from dsmoe.infer.chat import DEFAULT_CHAT_TEMPLATE, render_chat

    out = tmp_path / "hf"
    export_model(build("tiny"), "byte", out)
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name
    tok, eot = AutoTokenizer.from_pretrained(str(out)), get_tokenizer("byte").eot_id
    cfg, gen = (json.loads((out / name).read_text()) for name in ("config.json", "generation_config.json"))
    assert tok.pad_token_id == cfg["pad_token_id"] == gen["pad_token_id"] == eot
    assert "max_length" not in gen
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_CHAT_TEMPLATE
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [97, 98, eot, eot]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        load_hf(out).generate(batch["input_ids"][:1, :2], max_new_tokens=3, do_sample=False)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, naïve 東京?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == get_tokenizer("byte").encode(render_chat(messages))


def test_import_keeps_a_stored_head_untied(tmp_path):
    """config.json ties the head but the files hold a different lm_head.weight: transformers computes with the
    stored head, so the import does too (untied) instead of dropping it."""
    from safetensors.torch import load_file, save_file

    from transformers import AutoModelForCausalLM

    from dsmoe.interop.hf_config import arch_of
    from dsmoe.interop.hf_weights import from_hf

    random_deepseek_v3(tmp_path / "hf", tie_word_embeddings=True)
    write_tokenizer_files("byte", tmp_path / "hf", 64)
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(file))
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"]) * 0.1
    save_file(tensors, str(file), metadata={"format": "pt"})
    cfg = config_from_hf(tmp_path / "hf", "byte")
    assert cfg.model.tie_embeddings
    with pytest.raises(ExportError, match="lm_head.weight differs"):
        from_hf(tensors, cfg, arch_of("deepseek_v3"))
    ckpt = import_hf(tmp_path / "hf", tmp_path / "init.pt")
    model, _, cfg = load_model(str(ckpt), device="cpu")
    assert not cfg.model.tie_embeddings
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() < 1e-5
