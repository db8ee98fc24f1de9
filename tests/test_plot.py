"""python -m dsmoe.plot: PNGs from metrics.jsonl, several runs overlaid, and errors for missing data."""

import json

import pytest

from dsmoe.plot import load_runs, main, plot_runs

pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(folder, seed, n_steps=12, truncated=False):
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, n_steps + 1):
        counts = [[100 + seed * step, 80, 60 + step, 40], [90, 90 - step, 70, 50 + seed]]
        rows.append({"time": step, "step": step, "loss": 5.0 / step + seed, "lr": 1e-3 * min(step, 4) / 4,
                     "tokens_per_s": 1000.0 + 10 * step, "mfu": 0.3 + 0.01 * seed, "mem_gb": 1.5, "rss_gb": 0.8,
                     "expert_imbalance": 1.5, "tokens_per_expert": counts})
        if step % 4 == 0:
            rows.append({"time": step, "step": step, "val_loss": 5.5 / step + seed, "val_ppl": 3.0})
    rows.append({**rows[0], "loss": 42.0})  # a step logged again (a resumed run): the last row wins
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(text + ('{"step": 13, "lo' if truncated else ""))
    return rows


def test_plots_of_two_runs_are_pngs(tmp_path):
    _write_run(tmp_path / "a" / "run", seed=0)
    _write_run(tmp_path / "b" / "run", seed=1, truncated=True)
    written = plot_runs([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == sorted(["overview.png", "loss.png", "lr.png", "tokens_per_s.png", "mfu.png", "memory.png",
                            "expert_imbalance.png", "expert_imbalance_per_layer.png"])
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    from PIL import Image

    with Image.open(tmp_path / "plots" / "overview.png") as image:
        image.verify()


def test_series_read_from_the_rows(tmp_path):
    _write_run(tmp_path / "x", seed=1, truncated=True)
    (run,) = load_runs([tmp_path / "x"])
    steps, loss = run.series("loss")
    assert steps == list(range(1, 13)) and loss[0] == 42.0 and loss[1] == pytest.approx(5.0 / 2 + 1)
    assert run.series("val_loss") == ([4, 8, 12], [pytest.approx(5.5 / s + 1) for s in (4, 8, 12)])
    assert run.series("mfu")[1][0] == pytest.approx(31.0)  # percent
    layers = run.layer_imbalance()
    counts = [90, 90 - 3, 70, 50 + 1]
    assert len(layers) == 2 and layers[1][1][2] == pytest.approx(max(counts) / (sum(counts) / 4))


def test_runs_without_a_panel_skip_its_png(tmp_path):
    folder = tmp_path / "cpu-run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "lr": 1e-3, "mfu": None}) + "\n")
    names = {p.name for p in plot_runs([folder], tmp_path / "out")}
    assert names == {"overview.png", "loss.png", "lr.png"}


def test_missing_or_empty_metrics_get_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        plot_runs([tmp_path], tmp_path / "out")
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no metrics rows yet"):
        plot_runs([tmp_path], tmp_path / "out")
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere/metrics.jsonl not found" in capsys.readouterr().err


def test_damaged_lines_are_skipped_and_counted(tmp_path, capsys):
    """A row glued onto a torn one, a non-UTF-8 line, a JSON line without a step, a torn last line."""
    good = [{"step": 1, "loss": 2.0}, {"step": 3, "loss": 1.0}, {"step": 4, "loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_bytes(
        (json.dumps(good[0]) + '\n{"step": 2, "lo{"step": 2, "loss": 1.5}\n').encode()
        + b'{"step": 2, "note": "caf\xe9"}\n' + (json.dumps(good[1]) + "\n[1, 2]\n" + json.dumps(good[2])
                                                  + '\n{"step": 5, "lo').encode())
    (run,) = load_runs([tmp_path])
    assert run.series("loss") == ([1, 3, 4], [2.0, 1.0, 0.5])
    err = capsys.readouterr().err
    assert "skipped 4 unreadable line(s)" in err and "line 2, 3, 5, 7" in err
    assert main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
