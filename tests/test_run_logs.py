"""A run's log files across crashes: whole-line appends, and torn or undecodable rows moved aside at resume."""
import json

from cli import losses_by_step, rows
from conftest import small_config
from dsmoe.metrics.logger import LineFile
from dsmoe.train.trainer import Trainer


def test_a_row_is_never_glued_onto_a_torn_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    f = LineFile(path)
    f.write(json.dumps({"step": 3}) + "\n")
    f.close()
    assert path.read_text().splitlines()[-1] == '{"step": 3}'


def test_torn_and_undecodable_rows_move_aside_at_resume(tmp_path, data_cache, capsys):
    """A crash mid-write left a torn last row; a damaged disk left a non-UTF-8 line: the resume moves both
    to metrics.superseded.jsonl with a warning, and metrics.jsonl then holds each step once, readable."""
    d, ref = tmp_path / "run", tmp_path / "ref"
    Trainer(small_config(d, data_cache, "--train.steps=6", "--train.stop_after=4", "--checkpoint.every=2")).fit()
    metrics = d / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    damaged = b'{"step": 2, "note": "caf\xe9"}\n'
    metrics.write_bytes(b"".join(lines[:2]) + damaged + b"".join(lines[2:]) + b'{"step": 5, "lo')
    capsys.readouterr()
    Trainer(small_config(d, data_cache, "--train.steps=6", "--checkpoint.every=2"), resume="auto").fit()
    err = capsys.readouterr().err
    assert f"{metrics}:3 is a torn or undecodable row" in err and f"{metrics}:6 is a torn or undecodable row" in err
    aside = (d / "metrics.superseded.jsonl").read_bytes().splitlines()
    assert aside == [damaged.rstrip(b"\n"), b'{"step": 5, "lo']
    Trainer(small_config(ref, data_cache, "--train.steps=6")).fit()
    assert losses_by_step(d) == losses_by_step(ref)  # every row parses (rows() would raise otherwise)
    assert len(rows(d)) == len(rows(ref))
