"""``kdzoo plot`` and the demo's curves: what is plotted, the image written, clear errors."""

from __future__ import annotations

import json

import pytest

from kdzoo.cli import main
from kdzoo.errors import UserInputError
from kdzoo.plot import _series, plot_runs, read_metrics

RECORDS = [
    {"stage": "init", "epoch": 1, "step": 4, "train/loss_ab": 8.0},  # an init stage: no evaluation
    {"stage": "main", "epoch": 1, "step": 8, "train/loss_ce": 2.0, "train/loss_kd": 0.5, "top1": 40.0, "loss": 1.9},
    {"stage": "main", "epoch": 2, "step": 12, "train/loss_ce": 1.0, "train/loss_kd": 0.25, "top1": 55.5, "loss": 1.2},
]


def _run(tmp_path, name, records=RECORDS):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_series_sum_the_loss_terms_and_skip_unevaluated_epochs(tmp_path):
    x, top1, loss = _series(read_metrics(_run(tmp_path, "kd")))
    assert x == [1, 2, 3]  # epochs counted across stages
    assert top1 == [None, 40.0, 55.5]
    assert loss == [8.0, 2.5, 1.25]  # train/loss_* only; the test "loss" is not a training term


def test_plot_writes_an_image_of_every_run(tmp_path):
    runs = [_run(tmp_path, "kd"), _run(tmp_path, "dkd", RECORDS[1:])]
    out = plot_runs(runs, tmp_path / "out" / "curves.png", ["KD", "DKD"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert main(["plot", str(runs[0]), str(runs[1]), "--output", str(tmp_path / "c.svg")]) == 0
    assert "<svg" in (tmp_path / "c.svg").read_text()[:500]


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    broken = _run(tmp_path, "broken")
    (broken / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, oops\n')
    with pytest.raises(UserInputError, match="line 2 is not JSON"):
        read_metrics(broken)
    (broken / "metrics.jsonl").write_text("")
    with pytest.raises(UserInputError, match="no epochs"):
        read_metrics(broken)
    with pytest.raises(UserInputError, match="2 labels for 1 runs"):
        plot_runs([_run(tmp_path, "ok")], tmp_path / "x.png", ["a", "b"])
    assert not (tmp_path / "x.png").exists()
