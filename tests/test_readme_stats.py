"""The README's export and compare sections run as written (tiny models, no download)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from gsnr_diag.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(heading: str, lang: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def _commands(block: str, program: str) -> list[tuple[list[str], str]]:
    """``(argv after the program name, comment)`` of each line of a bash block that runs ``program``."""
    out = []
    for line in block.splitlines():
        command, _, comment = line.partition("#")
        argv = shlex.split(command)
        if argv[:1] == [program]:
            out.append((argv[1:], comment))
    return out


def test_readme_export_section_runs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    code = _blocks("## Send the statistics to TensorBoard", "python")[0]
    exec(compile(code, str(README), "exec"), {})
    for d in ("runs/live", "runs/saved"):
        acc = EventAccumulator(d)
        acc.Reload()
        assert "gsnr/noise_scale" in acc.Tags()["scalars"], d
    assert list(Path("wandb-offline/wandb").glob("offline-run-*/run-*.wandb"))
    for argv, _ in _commands(_blocks("## Send the statistics to TensorBoard", "bash")[0], "gsnr-diag"):
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, result.output


def test_readme_compare_section_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("## Regressions against a baseline", "python")
    exec(compile(blocks[0], str(README), "exec"), {})
    commands = _commands(_blocks("## Regressions against a baseline", "bash")[0], "gsnr-diag")
    assert len(commands) == 3
    for argv, comment in commands:
        expected = int(re.search(r"exit (\d)", comment).group(1))
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == expected, (argv, result.output)
    assert Path("deltas.json").exists()
    # the numbers the README quotes
    out = CliRunner().invoke(main, ["compare", "baseline.json", "after.json"]).output
    assert re.search(r"mean_gsnr .* -92\.\d% .* -27\.\d+ +REGRESSION", out), out
    # the test example is valid Python that uses the fixture's API
    compile(blocks[1], "README test example", "exec")
