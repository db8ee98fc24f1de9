"""Tokenizer files transformers loads (tokenizer.json + tokenizer_config.json) for dsmoe's tokenizers.

Both kinds become one byte-level BPE of the `tokenizers` library, built by transformers' own
TikTokenConverter from merge ranks that dsmoe already holds (nothing is downloaded):
- `tiktoken:NAME`: the encoding's ranks, split pattern and special tokens (offline for gpt2 and
  cl100k_base, see dsmoe.data.tokenizer).
- `byte`: 256 single-byte ranks and no merges, so byte b is id b, and end-of-text is id 256.
`split_special_tokens=True`: a literal "<|endoftext|>" inside a text is text, as dsmoe's encode_ordinary
treats it; the end-of-text id is still the tokenizer's eos_token_id, and its pad_token_id (as in config.json
and generation_config.json), so `padding=True` works. tokenizer_config.json carries the chat template the
server applies (dsmoe.infer.chat), so `apply_chat_template` gives the server's prompt ids.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from dsmoe.data import get_tokenizer
from dsmoe.infer.chat import chat_template

EOT_TEXT = "<|endoftext|>"  # the byte tokenizer's end-of-text (id 256) gets tiktoken's name for it
KNOWN = ("byte", "tiktoken:gpt2", "tiktoken:cl100k_base")
_PROBE = "Probe: naïve café, 東京 🤖\n\t  x = 12345; it's <|endoftext|> 'll\r\n"


def _bpe_spec(name: str) -> tuple[dict[bytes, int], str, dict[str, int], str]:
    """(merge ranks, pre-tokenizer split pattern, special tokens, end-of-text text) of a dsmoe tokenizer."""
    tok = get_tokenizer(name)
    if name == "byte":
        return {bytes([b]): b for b in range(256)}, r"[\s\S]", {EOT_TEXT: tok.eot_id}, EOT_TEXT
    enc = tok._encoding  # the tiktoken.Encoding dsmoe built (offline where the files ship in a package)
    specials = dict(enc._special_tokens)
    eot = next(text for text, i in specials.items() if i == tok.eot_id)
    return enc._mergeable_ranks, enc._pat_str, specials, eot


def hf_tokenizer(name: str, model_max_length: int):
    """A transformers fast tokenizer that encodes every text to the ids dsmoe's `name` tokenizer gives."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks, pattern, specials, eot = _bpe_spec(name)

    class RanksConverter(TikTokenConverter):
        # the stock path reads a .tiktoken file, and writing one needs the blobfile package: hand it the ranks
        def load_tiktoken_bpe(self, _path):
            return ranks

        # the stock converter numbers special tokens on from the last rank, but cl100k_base's sit past a gap
        # (<|endoftext|> = 100257 after 100256 ranks): placed in the vocabulary, they keep their ids
        def extract_vocab_merges_from_model(self, path):
            vocab, merges = super().extract_vocab_merges_from_model(path)
            return {**vocab, **specials}, merges

    backend = RanksConverter(pattern=pattern, extra_special_tokens=specials).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eot, pad_token=eot, split_special_tokens=True,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False,
                                   chat_template=chat_template(get_tokenizer(name)))


def write_tokenizer_files(name: str, out_dir: str | Path, model_max_length: int) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json into `out_dir`; returns the file names."""
    # save_jinja_files=False: the chat template inside tokenizer_config.json, where every reader looks
    # (transformers also reads chat_template.jinja, older tools and converters only the config)
    return [Path(p).name for p in hf_tokenizer(name, model_max_length).save_pretrained(str(out_dir),
                                                                                       save_jinja_files=False)
            if Path(p).is_file()]


def detect_tokenizer(hf_dir: str | Path) -> Optional[str]:
    """The dsmoe tokenizer (`byte`, `tiktoken:gpt2`, `tiktoken:cl100k_base`) whose ids the directory's
    tokenizer reproduces (same vocabulary size, same ids for a probe text), or None (no tokenizer files, or
    another tokenizer)."""
    if not (Path(hf_dir) / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(hf_dir))
    size = max(theirs.get_vocab().values()) + 1
    ids = theirs.encode(_PROBE, add_special_tokens=False)
    for name in KNOWN:
        ours = get_tokenizer(name)
        if ours.vocab_size == size and ours.encode(_PROBE) == ids:
            return name
    return None
