"""One seed rule for every way of generating (launch/generate.py, its prompt loop, the server).

A command (or a session, or a request) has a base seed: the one given (`--seed`, `"seed"`), else a
fresh random one. Its i-th prompt samples from the seed `prompt_seed(base, i)`, so prompts completed
together, or typed one after another, each get their own draws (the same prompt twice gives two
continuations), while the same base and the same prompts repeat the same outputs.
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Optional

SEED_BITS = 63  # torch.Generator.manual_seed takes any int below 2**64; 63 bits stay positive in every language


def base_seed(seed: Optional[int]) -> int:
    """The given seed, or a fresh random one."""
    return secrets.randbits(SEED_BITS) if seed is None else seed


def prompt_seed(base: int, index: int) -> int:
    """The seed of prompt `index` (0, 1, ...) under `base`: a hash, so nearby bases and indices give
    unrelated streams (base + index would make base 1's prompt 0 equal base 0's prompt 1)."""
    digest = hashlib.blake2b(f"{base}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)
