"""Export a dsmoe checkpoint as a transformers model directory, or import one as a dsmoe checkpoint.

    python -m dsmoe.export --ckpt auto --run-dir runs/tiny-shakespeare --out exported/tiny-shakespeare
    python -m dsmoe.export --ckpt ckpt.pt --out DIR --max-shard-size 2GB --dtype bf16
    python -m dsmoe.export --from-hf DIR --out init.pt [--tokenizer byte|tiktoken:NAME]

Export writes config.json, model.safetensors (shards and model.safetensors.index.json past
--max-shard-size), generation_config.json and the tokenizer files: `AutoModelForCausalLM.from_pretrained(DIR)`
and `AutoTokenizer.from_pretrained(DIR)` load them with no remote code. The architecture is the transformers
one that computes exactly what dsmoe computes (table in dsmoe/interop/hf_config.py), or the export is
refused with the config field that blocks it.

An exported checkpoint also carries its run's `train` and `data` sections in dsmoe_run.yaml (transformers
ignores it): importing that directory restores them, so `python -m dsmoe.eval` evaluates the imported
weights on the same windows as the original and gets the same number.

Import writes a weights-only dsmoe checkpoint (`weights_only: True`: the model tensors, the config, the
tokenizer, no optimizer or progress): generation, `python -m dsmoe.eval` and export read it like any
checkpoint, and training starts from its weights with a fresh optimizer and schedule.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from dsmoe.config import ConfigError, TrainConfig, from_dict
from dsmoe.data import get_tokenizer
from dsmoe.interop.hf_config import ExportError, check_exportable, config_from_hf, hf_config_dict
from dsmoe.interop.hf_weights import load_hf_weights, save_safetensors, stored_head_differs, to_hf
from dsmoe.interop.tokenizer_files import detect_tokenizer, write_tokenizer_files
from dsmoe.model import Transformer
from dsmoe.checkpoint import CheckpointError, save_checkpoint
from dsmoe.train.precision import DTYPES

HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
RUN_SECTIONS_FILE = "dsmoe_run.yaml"  # the exported run's train and data sections (its evaluation protocol)


def export_model(model: Transformer, tokenizer_name: str, out_dir: str | Path, *,
                 max_shard_size: Union[int, str] = "5GB", dtype: str = "fp32", dropless: bool = False,
                 sampling: Optional[TrainConfig] = None) -> dict:
    """Write `model` (with dsmoe tokenizer `tokenizer_name`) as a transformers directory.

    `dtype` (fp32, bf16, fp16) is the stored dtype of every tensor but the routers (fp32). `sampling`: the
    temperature and top-k written as generate()'s defaults. Padding rows of the vocabulary (the embedding's
    rows past the tokenizer's ids) are exported and listed in generation_config.json's `suppress_tokens`,
    so generate() never samples them, as dsmoe does not. generation_config.json sets no max_length (the
    context is config.json's max_position_embeddings; a max_length there makes generate(max_new_tokens=)
    warn). Files are 0644. Returns {"architecture", "files"}.
    Raises ExportError naming the field that blocks an exact export, or a non-empty `out_dir`."""
    from transformers import AutoConfig, GenerationConfig

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} is not empty: choose a new directory (files of an earlier export, such as "
                          f"other shards, would mix with this one)")
    cfg, state = model.cfg, model.state_dict()
    bias_nonzero = any(bool(v.any()) for k, v in state.items() if k.endswith("router.expert_bias"))
    arch = check_exportable(cfg, bias_nonzero, dropless)
    tok = get_tokenizer(tokenizer_name)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = AutoConfig.for_model(arch.model_type, **hf_config_dict(cfg, arch, model.vocab_size, tok.eot_id,
                                                                     HF_DTYPE_NAMES[dtype]))
    hf_cfg.save_pretrained(str(out))
    files = ["config.json"] + save_safetensors(to_hf(state, cfg, arch, DTYPES[dtype]), out, max_shard_size)
    t = sampling or TrainConfig()
    GenerationConfig(eos_token_id=tok.eot_id, pad_token_id=tok.eot_id, do_sample=t.temperature > 0,
                     temperature=t.temperature if t.temperature > 0 else None, top_k=t.sample_top_k or None,
                     suppress_tokens=list(range(tok.vocab_size, model.vocab_size)) or None).save_pretrained(str(out))
    files.append("generation_config.json")
    files += write_tokenizer_files(tok.name, out, cfg.model.max_seq_len)
    for name in files:  # readable by all as any saved model (the safetensors writer leaves 0600)
        (out / name).chmod(0o644)
    return {"architecture": arch.cls, "files": sorted(set(files))}


def export_checkpoint(ckpt: str, run_dir: str, out_dir: str | Path, **kw) -> dict:
    """`export_model` of a checkpoint file or directory (`auto`: the newest in `run_dir`)."""
    from dsmoe.checkpoint.load import load_model

    model, tok, cfg = load_model(ckpt, run_dir, device="cpu")
    done = export_model(model, tok.name, out_dir, sampling=cfg.train, **kw)
    tree = cfg.to_dict()
    (Path(out_dir) / RUN_SECTIONS_FILE).write_text(yaml.safe_dump({k: tree[k] for k in ("train", "data")},
                                                                   sort_keys=False))
    return {**done, "files": sorted(done["files"] + [RUN_SECTIONS_FILE])}


def import_hf(hf_dir: str | Path, out_path: str | Path, tokenizer: Optional[str] = None) -> Path:
    """A transformers checkpoint directory -> a weights-only dsmoe checkpoint file (save_checkpoint's format:
    model, config, data.tokenizer, data.vocab_size, weights_only=True).

    `tokenizer`: the dsmoe tokenizer name; None = recognise it from the directory's tokenizer files.
    Raises ExportError for an architecture or config dsmoe cannot represent, or tensors that do not fit."""
    out = Path(out_path)
    if out.exists():
        raise ExportError(f"--out {out} exists: choose another file name")
    tokenizer = tokenizer or detect_tokenizer(hf_dir)
    if tokenizer is None:
        raise ExportError(f"{hf_dir}: its tokenizer files are missing or encode unlike dsmoe's byte, tiktoken:gpt2 "
                          f"and tiktoken:cl100k_base: pass --tokenizer NAME (the tokenizer the weights were trained with)")
    vocab = get_tokenizer(tokenizer).vocab_size
    cfg = config_from_hf(hf_dir, tokenizer, name=Path(hf_dir).resolve().name)
    run_file = Path(hf_dir) / RUN_SECTIONS_FILE
    if run_file.is_file():  # exported by dsmoe: its run's data and evaluation settings
        run = yaml.safe_load(run_file.read_text()) or {}
        tree = cfg.to_dict()
        cfg = from_dict({**tree, "train": run.get("train", tree["train"]),
                         "data": {**run.get("data", {}), "tokenizer": tokenizer}})
    if cfg.model.vocab_size < vocab:
        raise ExportError(f"vocab_size={cfg.model.vocab_size} in {hf_dir}/config.json is smaller than tokenizer "
                          f"{tokenizer}'s {vocab} ids: pass the --tokenizer the model was trained with")
    if cfg.model.tie_embeddings and stored_head_differs(hf_dir):  # transformers computes with the stored head
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tie_embeddings=False))
        print(f"{hf_dir}: config.json says tie_word_embeddings but lm_head.weight differs from the embedding: "
              f"imported untied, computing what transformers computes")
    with torch.device("meta"):  # shapes only: the weights come from the files
        model = Transformer(cfg)
    state = load_hf_weights(hf_dir, model)
    data = {"tokenizer": tokenizer, "vocab_size": cfg.model.vocab_size, "source": cfg.data.source}
    return save_checkpoint({"model": state, "config": cfg.to_dict(), "data": data, "weights_only": True,
                            "imported_from": str(Path(hf_dir).resolve())}, out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="export: checkpoint file or sharded directory, or 'auto' (newest in --run-dir)")
    src.add_argument("--from-hf", metavar="DIR", help="import: a transformers checkpoint directory")
    p.add_argument("--run-dir", default=".", help="export with --ckpt auto: the run directory")
    p.add_argument("--out", required=True, help="export: a new directory; import: the checkpoint file to write")
    p.add_argument("--max-shard-size", default="5GB", help="export: largest safetensors file (e.g. 500MB, 5GB)")
    p.add_argument("--dtype", choices=sorted(HF_DTYPE_NAMES), default="fp32", help="export: stored dtype")
    p.add_argument("--dropless", action="store_true",
                   help="export a model trained with capacity dropping as the dropless model dsmoe infers with")
    p.add_argument("--tokenizer", default=None, help="import: dsmoe tokenizer name (default: recognised from DIR)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never reach for the model hub
    try:
        if args.from_hf:
            path = import_hf(args.from_hf, args.out, args.tokenizer)
            print(f"imported {args.from_hf} -> {path} (weights only)")
        else:
            size = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size
            info = export_checkpoint(args.ckpt, args.run_dir, args.out, max_shard_size=size, dtype=args.dtype,
                                     dropless=args.dropless)
            print(f"exported {info['architecture']} -> {args.out}: {', '.join(info['files'])}")
    except (ExportError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
