"""The gsnr-diag CLI with click's CliRunner: each exit code, model-file errors, user exceptions."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner

from gsnr_diag.cli import main

TINY = """
import torch
from torch import nn

EPOCHS = 2
LR = 0.2
BATCH_SIZE = 16

def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

def load_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g)
    Y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return (X[:48], Y[:48]), (X[48:], Y[48:])
"""


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real `gsnr-diag report` run (control, OSGR experiment, PDF), shared by the tests below."""
    d = tmp_path_factory.mktemp("cli")
    model = write(d / "tiny.py", TINY)
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "report",
            str(model),
            "--out",
            str(d / "r.html"),
            "--pdf",
            str(d / "r.pdf"),
            "--run-json",
            str(d / "r.run.json"),
            "--osgr-sets",
            "2",
            "--quiet",
        ],
    )
    return d, result


def test_help_documents_exit_codes():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for line in ("0  success", "1  check: one or more thresholds failed", "2  usage or input error"):
        assert line in result.output
    for cmd in ("report", "render", "stats", "check"):
        assert cmd in result.output
    sub = CliRunner().invoke(main, ["report", "--help"])
    assert sub.exit_code == 0 and "build_model()" in sub.output and "Exit codes" in sub.output


def test_report_exit_0_writes_html_pdf_and_run_json(tiny_run):
    d, result = tiny_run
    assert result.exit_code == 0, result.output
    html = (d / "r.html").read_text()
    assert "tiny (Sequential)" in html and "shuffled labels" in html
    assert (d / "r.pdf").read_bytes().startswith(b"%PDF")
    run = json.loads((d / "r.run.json").read_text())
    assert run["kind"] == "gsnr-diag-run" and run["control"] is not None
    assert run["osgr"] and run["osgr"][0]["settings"]["M"] == 2 and "Pearson c" in html
    assert run["metadata"].get("partial") is None
    assert run["metadata"]["settings"]["epochs"] == 2  # the file's EPOCHS
    assert len(run["trajectory"]["snapshots"]) >= 3


def test_render_reproduces_the_same_html(tiny_run, tmp_path):
    d, _ = tiny_run
    out = tmp_path / "again.html"
    result = CliRunner().invoke(main, ["render", str(d / "r.run.json"), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert out.read_text() == (d / "r.html").read_text()


def test_check_exit_codes(tiny_run, tmp_path):
    d, _ = tiny_run
    run_json = str(d / "r.run.json")
    runner = CliRunner()
    ok = runner.invoke(main, ["check", run_json, "--min-mean-gsnr", "0", "--min-same-sign", "0"])
    assert ok.exit_code == 0, ok.output
    assert "all thresholds hold" in ok.output
    bad = runner.invoke(main, ["check", run_json, "--min-mean-gsnr", "1e9", "--min-osgr", "2", "--min-same-sign", "0"])
    assert bad.exit_code == 1
    assert "--min-mean-gsnr 1e+09" in bad.output and "--min-osgr 2" in bad.output
    assert "2 threshold(s) failed" in bad.output
    broken = tmp_path / "broken.json"
    broken.write_text('{"kind": "gsnr-diag-run"')
    assert runner.invoke(main, ["check", str(broken), "--min-osgr", "0"]).exit_code == 2
    assert runner.invoke(main, ["check", str(tmp_path / "absent.json")]).exit_code == 2


def test_check_fails_on_missing_evidence(tmp_path):
    run = json.loads(
        json.dumps(
            {
                "schema_version": 1,
                "kind": "gsnr-diag-run",
                "trajectory": None,
                "control": None,
                "osgr": None,
                "final_stats": None,
                "metadata": {},
            }
        )
    )
    path = tmp_path / "empty.run.json"
    path.write_text(json.dumps(run))
    result = CliRunner().invoke(main, ["check", str(path), "--min-control-ratio", "1.5"])
    assert result.exit_code == 1 and "not measured" in result.output


def test_usage_errors_exit_2(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["report"]).exit_code == 2
    assert runner.invoke(main, ["report", "x.py", "--epochs", "0"]).exit_code == 2
    assert runner.invoke(main, ["nonsense"]).exit_code == 2
    missing = runner.invoke(main, ["report", str(tmp_path / "missing.py")])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_missing_names_in_the_model_file(tmp_path):
    model = write(tmp_path / "incomplete.py", "import torch\n\ndef build_model():\n    return torch.nn.Linear(2, 2)\n")
    result = CliRunner().invoke(main, ["report", str(model), "--out", str(tmp_path / "x.html")])
    assert result.exit_code == 2
    assert "missing required name load_data" in result.output
    assert "A minimal model file looks like this" in result.output
    assert not (tmp_path / "x.html").exists()


def test_user_exception_shows_the_users_traceback(tmp_path):
    model = write(
        tmp_path / "raises.py",
        TINY
        + textwrap.dedent("""
        def load_data():
            return make_tensors()

        def make_tensors():
            raise RuntimeError("the user's own bug")
    """),
    )
    result = CliRunner().invoke(main, ["report", str(model), "--out", str(tmp_path / "x.html"), "-q"])
    assert result.exit_code == 2
    out = result.output
    assert "Your traceback" in out and "RuntimeError: the user's own bug" in out
    assert "in make_tensors" in out and str(model) in out
    assert "gsnr_diag/cli.py" not in out and "modelfile.py" not in out and "pipeline.py" not in out


def test_user_exception_during_training_shows_the_users_frames(tmp_path):
    model = write(
        tmp_path / "forward_bug.py",
        TINY
        + textwrap.dedent("""
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(4, 3)
                self.calls = 0

            def forward(self, x):
                self.calls += self.training  # count training steps only (the monitor measures in eval mode)
                if self.calls > 3:
                    raise ValueError("forward failed on call %d" % self.calls)
                return self.lin(x)

        def build_model():
            return Net()
    """),
    )
    result = CliRunner().invoke(
        main,
        [
            "report",
            str(model),
            "--no-control",
            "--out",
            str(tmp_path / "x.html"),
            "--run-json",
            str(tmp_path / "x.run.json"),
            "-q",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "ValueError: forward failed" in result.output and "in forward" in result.output
    assert "gsnr_diag/cli.py" not in result.output
    # the run JSON keeps what was measured before the crash
    saved = json.loads((tmp_path / "x.run.json").read_text())
    assert saved["metadata"]["partial"] is True and "ValueError" in saved["metadata"]["stopped"]


def test_stats_at_init_and_at_saved_weights(tmp_path):
    model = write(tmp_path / "tiny.py", TINY)
    runner = CliRunner()
    result = runner.invoke(main, ["stats", str(model)])
    assert result.exit_code == 0, result.output
    assert "0.weight" in result.output and "mean GSNR" in result.output and "initialization" in result.output
    ns: dict = {}
    exec(textwrap.dedent(TINY), ns)
    ckpt = tmp_path / "w.pt"
    torch.save(ns["build_model"]().state_dict(), ckpt)
    result = runner.invoke(main, ["stats", str(model), "--weights", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert "at weights" in result.output
    # a pickled arbitrary object is refused by weights_only=True: input error, exit 2
    bad = tmp_path / "bad.pt"
    torch.save({"model": ns["build_model"]()}, bad)
    result = runner.invoke(main, ["stats", str(model), "--weights", str(bad)])
    assert result.exit_code == 2 and "weights_only=True" in result.output
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), wrong)
    result = runner.invoke(main, ["stats", str(model), "--weights", str(wrong)])
    assert result.exit_code == 2 and "does not match" in result.output


def test_check_prints_numbers_with_the_one_formatter(tmp_path):
    snaps = [{"step": 0, "mean_gsnr": 0.5}, {"step": 10, "mean_gsnr": 12345.678}]
    run = {
        "schema_version": 1,
        "kind": "gsnr-diag-run",
        "trajectory": {"snapshots": snaps, "metadata": {}},
        "control": None,
        "osgr": None,
        "final_stats": None,
        "metadata": {},
    }
    path = tmp_path / "big.run.json"
    path.write_text(json.dumps(run))
    result = CliRunner().invoke(main, ["check", str(path), "--min-mean-gsnr", "1"])
    assert result.exit_code == 0, result.output
    assert "final mean GSNR: 12,346 (required ≥ 1" in result.output


def test_click_progress_bar_restarts_per_run(capsys):
    from gsnr_diag.cli.common import ClickProgress

    bar = ClickProgress()
    for done in (0, 1, 2, 0, 1, 2):  # two runs of 2 steps each, as in the control
        bar(done, 2)
    bar.close()
    assert capsys.readouterr().err.count("training") == 2
