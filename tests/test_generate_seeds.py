"""launch/generate.py's seed rule (dsmoe/infer/seeds.py): each prompt of a command or of the prompt
loop draws from its own seed under one base seed, random unless --seed; /show is readable."""
import importlib.util

import pytest

from conftest import REPO
from dsmoe.data.tokenizer import ByteTokenizer
from dsmoe.infer import SamplingParams
from dsmoe.infer.seeds import base_seed, prompt_seed
from test_infer import build

PARAMS = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=0)


@pytest.fixture(scope="module")
def gen():
    """launch/generate.py as a module (it imports launch/common.py by name)."""
    import sys

    sys.path.insert(0, str(REPO / "launch"))
    spec = importlib.util.spec_from_file_location("launch_generate", REPO / "launch" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    return build("mla")


def test_seed_rule():
    assert base_seed(7) == 7 and base_seed(None) != base_seed(None)
    seeds = {prompt_seed(b, i) for b in range(3) for i in range(3)}
    assert len(seeds) == 9 and all(0 <= s < 2 ** 63 for s in seeds)


def test_prompts_of_a_command_get_their_own_continuations(gen, model):
    tok = ByteTokenizer()
    same = gen.complete(model, tok, ["KING:", "KING:"], PARAMS, base=3)
    assert same[0] != same[1]  # one seed for all gave every identical prompt the same text
    assert gen.complete(model, tok, ["KING:", "KING:"], PARAMS, base=3) == same  # the same --seed repeats
    assert gen.complete(model, tok, ["KING:", "KING:"], PARAMS, base=base_seed(None)) != same


def test_the_prompt_loop_does_not_repeat_itself_and_shows_settings(gen, model, monkeypatch, capsys):
    tok = ByteTokenizer()

    def session(*lines, seed=None):
        feed = iter(lines)
        monkeypatch.setattr("builtins.input", lambda _: next(feed))
        gen.interactive(model, tok, gen.dataclasses.replace(PARAMS, seed=seed))
        return capsys.readouterr()

    out = session("ROMEO:", "ROMEO:", "/quit").out.split("ROMEO:")  # the texts are random bytes, newlines too
    assert len(out) == 3 and out[0] == "" and out[1] != out[2]
    assert session("ROMEO:", "ROMEO:", "/quit", seed=5).out == session("ROMEO:", "ROMEO:", "/quit", seed=5).out
    err = session("/set stop \\n\\n", "/set seed 11", "/quit").err
    shown = err.split("settings")[-1] if "settings" in err else err
    assert "  temperature        1.0" in shown and "  seed               11 (set;" in shown
    assert "  stop               '\\n\\n'" in shown and "SamplingParams(" not in err
