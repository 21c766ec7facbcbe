"""The README's Lightning, Hugging Face Trainer and online-mode examples run as written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(heading: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_example(heading), str(README), "exec"), namespace)
    return namespace


def test_lightning_example(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    ns = _run("### PyTorch Lightning: `GSNRCallback`", tmp_path, monkeypatch)
    assert ns["steps"] == [0, 10, 20, 30, 40, 50]
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "gsnr/mean_gsnr" in metrics and "gsnr/noise_scale" in metrics
    assert (tmp_path / "gsnr.jsonl").exists()


def test_transformers_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ns = _run("### Hugging Face Trainer: `GSNRTrainerCallback`", tmp_path, monkeypatch)
    assert [s.step for s in ns["gsnr"].trajectory.snapshots] == [0, 5, 10]
    assert "gsnr/osgr" in capsys.readouterr().out


def test_online_example(tmp_path, monkeypatch, capsys):
    ns = _run("### Online mode: GSNR from the training mini-batches themselves", tmp_path, monkeypatch)
    assert ns["stats"].n == 640 and ns["snap"].step == 60
    assert "online" in capsys.readouterr().out
