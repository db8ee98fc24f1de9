"""What the trainer reads: prepared token files (a batch is a pure function of its sample position) or
a stream read, tokenized and packed on the fly (`data.streaming`, the default for `hf:` sources).

Either way the trainer asks for the micro-batch that starts at global sample position p. Prepared
files compute it; a stream hands out its next batch, and the batches of the current optimizer step
are kept so the guard's localisation can replay them. A stream's position (every rank's, merged) is
part of the checkpoint; prepared files need none beyond `samples`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from dsmoe.data import (StreamingBatches, TokenBatches, ensure_prepared, load_prepared, merge_stream_states,
                        val_batches)
from dsmoe.data.identity import files_identity, local_source_files
from dsmoe.train.prefetch import Prefetcher


def streaming_of(cfg) -> bool:
    return cfg.data.streaming if cfg.data.streaming is not None else cfg.data.source.startswith("hf:")


class TrainData:
    def __init__(self, cfg, mesh, device: torch.device):
        d, t, m = cfg.data, cfg.train, mesh
        self.mesh, self.device = mesh, device
        self.samples_per_micro_step, self.grad_accum = m.world * t.micro_batch, t.grad_accum
        self.stream: Optional[StreamingBatches] = None
        self.recent: dict[int, tuple] = {}  # a stream's batches of the current step, by position (replays)
        if streaming_of(cfg):
            self.stream = StreamingBatches(
                d.source, d.tokenizer, t.seq_len, t.micro_batch, rank=m.rank, world=m.world, seed=t.seed,
                data_files=d.hf_data_files, hf_config=d.hf_config, split=d.split, text_field=d.text_field,
                streams=d.streams, shuffle_buffer=d.shuffle_buffer, workers=d.workers,
                val_documents=d.val_documents, val_split=d.val_split)
            self.train_tokens = None  # unknown until read
            self.files = files_identity(self.stream.source.files)
            val_tokens = self.stream.validation_tokens() if t.eval_every else []
        else:
            self.files = files_identity(local_source_files(d.source))
            options = dict(val_fraction=d.val_fraction, hf_config=d.hf_config, split=d.split, text_field=d.text_field)
            if m.is_main:  # one rank tokenizes; the others wait and read the same files
                data_dir = ensure_prepared(d.source, d.tokenizer, cache_root=d.cache_dir, **options)
            if m.distributed:
                dist.barrier()
            if not m.is_main:
                data_dir = ensure_prepared(d.source, d.tokenizer, cache_root=d.cache_dir, **options)
            meta, train_tokens, val_tokens = load_prepared(data_dir)
            self.train_tokens = meta["train_tokens"]
            self.batches = TokenBatches(train_tokens, t.seq_len, t.micro_batch, rank=m.rank, world=m.world,
                                        seed=t.seed)
            self.prefetcher = Prefetcher(self.batches.rows, device)
        self.val, self.val_counted = [], 0
        if t.eval_every and len(val_tokens) > t.seq_len + 1:
            all_val = val_batches(val_tokens, t.seq_len, t.micro_batch, t.eval_batches)
            self.val = all_val[m.rank::m.world]
            self.val_counted = len(self.val)
            # Every rank runs as many batches: under expert parallelism each MoE forward is a collective
            # of the EP group, and evaluate() ends in an all-reduce. Short shards repeat a batch that
            # is run but not counted.
            self.val += [all_val[0]] * (-(-len(all_val) // m.world) - len(self.val))

    def batch(self, first_sample: int, prefetch_next: bool = False):
        """This rank's micro-batch of the global micro-step starting at sample `first_sample`, on the
        device; with prefetch_next (prepared files) the following one is built meanwhile. A stream is
        read in order (its own worker processes tokenize ahead); positions of the current step replay."""
        if self.stream is None:
            return self.prefetcher.get(first_sample, first_sample + self.samples_per_micro_step if prefetch_next
                                       else None)
        if first_sample not in self.recent:
            oldest = first_sample - (self.grad_accum - 1) * self.samples_per_micro_step
            self.recent = {k: v for k, v in self.recent.items() if k >= oldest}
            x, y = next(self.stream)
            self.recent[first_sample] = (x.to(self.device), y.to(self.device))
        return self.recent[first_sample]

    def state_dict(self) -> Optional[dict]:
        """Every rank's stream position, merged (a collective; None for prepared files)."""
        if self.stream is None:
            return None
        mine = self.stream.state_dict()
        states = [None] * self.mesh.world
        if self.mesh.distributed:
            dist.all_gather_object(states, mine)
        return merge_stream_states(states if self.mesh.distributed else [mine])

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.stream is None:
            return
        if state is None:
            raise ValueError("the checkpoint holds no data-stream position (it was trained on prepared files): "
                             "resume with its data settings, or start the stream afresh in a new run.dir")
        self.stream.load_state_dict(state)
        self.recent.clear()
