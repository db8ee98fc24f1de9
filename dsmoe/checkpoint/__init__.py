"""Checkpoints: the single-file format (file.py, with its streamed checksum, checksum.py), the sharded
DCP directory (sharded.py) and its integrity manifest and safe index reader (manifest.py), the
converter between them (convert.py), run directories and their lineage (run_dir.py) with the lock rank 0
holds on one for the run's life (lock.py), the one `auto|PATH` resolver every command uses (resolve.py),
and a checkpoint's model for inference (load.py)."""
from dsmoe.checkpoint.file import (CheckpointError, is_sharded, latest_checkpoint, list_checkpoints, load_checkpoint,
                                   save_checkpoint)
from dsmoe.checkpoint.resolve import read_state, resolve

__all__ = ["CheckpointError", "is_sharded", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "read_state", "resolve", "save_checkpoint"]
