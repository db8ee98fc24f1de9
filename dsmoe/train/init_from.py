"""Start training from weights made elsewhere: a transformers checkpoint directory (`--init-from-hf`),
or the model tensors of a dsmoe checkpoint (`--init-from`, e.g. the weights-only file that
`python -m dsmoe.export --from-hf` writes). Only the weights are taken: a fresh AdamW, step 0."""
from __future__ import annotations

from pathlib import Path

import torch

from dsmoe.config import Config, ConfigError
from dsmoe.model import Transformer
from dsmoe.parallel.expert_state import is_expert_param
from dsmoe.parallel.fsdp import place_shard
from dsmoe.checkpoint import CheckpointError, read_state
from dsmoe.checkpoint.file import check_compatible
from dsmoe.train.build import TrainState


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def init_config(source: str | Path, tokenizer: str | None = None) -> dict:
    """The config (as a tree) the source's weights were made with."""
    if is_hf_dir(source):
        from dsmoe.interop.hf_config import config_from_hf
        from dsmoe.interop.tokenizer_files import detect_tokenizer

        return config_from_hf(source, tokenizer=tokenizer or detect_tokenizer(source)).to_dict()
    from dsmoe.train.state import checkpoint_config

    return checkpoint_config(source)


def init_weights_of(source: str | Path, cfg: Config) -> dict[str, torch.Tensor]:
    """Whole (single-process shaped) model tensors by dsmoe name. Raises CheckpointError/ConfigError."""
    if is_hf_dir(source):
        from dsmoe.interop.hf_weights import load_hf_weights

        try:
            return load_hf_weights(source, cfg)
        except ValueError as e:  # an architecture or tensor dsmoe cannot take: the message names it
            raise ConfigError(f"--init-from-hf {source}: {e}") from None
    if not Path(source).exists():
        raise CheckpointError(f"--init-from {source}: no such checkpoint or transformers directory")
    return read_state(source, optimizer=False)["model"]


@torch.no_grad()
def load_weights(state: TrainState, cfg: Config, vocab_size: int, source: str) -> None:
    """Whole tensors from `source` into this rank's parameters of `state.model` (its experts, its FSDP
    shards), after check_compatible has compared the source's shapes and config with `cfg`'s."""
    whole = init_weights_of(source, cfg)
    with torch.device("meta"):  # the single-process shapes the source holds
        shapes = Transformer(cfg, vocab_size).state_dict()
    check_compatible({"config": cfg.to_dict(), "model": whole}, cfg.model_dict(), shapes, source)
    place = place_shard if state.fsdp else (lambda param, value: param.copy_(value))
    modules = dict(state.model.named_modules())
    for name, param in state.model.named_parameters():
        value = whole[name]
        if is_expert_param(name):  # this EP rank's rows
            first = modules[name.rsplit(".", 1)[0]].first
            value = value[first:first + param.shape[0]]
        place(param, value)
    for name, buf in state.model.named_buffers():
        if name in whole:  # the routing bias
            buf.copy_(whole[name])
