"""Every CLI mistake gets a clear answer: exit 2 (130 for Ctrl-C) and a one-paragraph message, never a traceback
of ours; a failing user ``forward`` shows the user's own traceback. One test per case, plus a hypothesis fuzz
of the run-JSON loader.
"""

from __future__ import annotations

import copy
import json
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gsnr_diag.cli import main
from gsnr_diag.dynamics.trajectory import Snapshot, Trajectory
from gsnr_diag.errors import TrajectoryFormatError
from gsnr_diag.experiments.results import ControlResult
from gsnr_diag.report import load_run, new_run, render_html, save_run, validate_run

TINY = """
import torch
from torch import nn

EPOCHS = 1
LR = 0.2
BATCH_SIZE = 16

def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

def load_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(48, 4, generator=g)
    Y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return (X[:40], Y[:40]), (X[40:], Y[40:])
"""


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_exit_2(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert result.output.startswith("Error: "), result.output
    for f in fragments:
        assert f in result.output, result.output
    return result.output.splitlines()[0]


def small_run(layer="0.weight", **meta):
    """A valid run dict built by hand (no training): 3 snapshots, a control, final stats."""

    def traj(scale):
        snaps = [
            Snapshot(
                step=s,
                epoch=s / 2,
                mean_gsnr=scale * (0.1 + s),
                layer_gsnr={layer: scale * (0.2 + s), "0.bias": 0.05},
                layer_same_sign={layer: 0.6, "0.bias": 0.55},
                osgr=0.5,
                mean_same_sign=0.6,
                train_loss=1.0 / (1 + s),
                test_loss=1.2 / (1 + s),
                generalization_gap=0.2 / (1 + s),
                train_accuracy=0.5,
                test_accuracy=0.4,
            )
            for s in (0, 1, 2)
        ]
        return Trajectory(snaps, {"model": "Net", "param_counts": {layer: 8, "0.bias": 2}, "n_train": 40})

    real, shuffled = traj(1.0), traj(0.2)
    control = ControlResult.from_runs(real, shuffled, 1.0)
    return new_run(
        real,
        control=control,
        final_stats={"mean_gsnr": 2.1, "layer_gsnr": {layer: 2.2, "0.bias": 0.05}, "n": 40},
        metadata={"model": "Net", "task": "classification", "settings": {"epochs": 1}, **meta},
    )


@pytest.fixture()
def run_file(tmp_path):
    return save_run(small_run(), tmp_path / "r.run.json")


def mutated(run_file, tmp_path, change):
    run = json.loads(run_file.read_text())
    change(run)
    path = tmp_path / "bad.run.json"
    path.write_text(json.dumps(run))
    return path


# ----------------------------------------------------------------------------- render: malformed run JSON
def test_render_non_utf8_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe{not text")
    assert_exit_2(invoke("render", bad), "not a text file in UTF-8")


def test_render_deeply_nested_json(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert_exit_2(invoke("render", deep), "nested too deeply")


def test_render_step_null(run_file, tmp_path):
    path = mutated(run_file, tmp_path, lambda r: r["trajectory"]["snapshots"][0].update(step=None))
    assert_exit_2(invoke("render", path), "run.trajectory.snapshots[0].step is null, expected an integer")


def test_render_layer_gsnr_as_a_list(run_file, tmp_path):
    path = mutated(run_file, tmp_path, lambda r: r["trajectory"]["snapshots"][1].update(layer_gsnr=[1, 2]))
    assert_exit_2(invoke("render", path), "run.trajectory.snapshots[1].layer_gsnr is a list")


def test_render_settings_as_a_list(run_file, tmp_path):
    path = mutated(run_file, tmp_path, lambda r: r["metadata"].update(settings=[1]))
    assert_exit_2(invoke("render", path), "run.metadata.settings is a list")


def test_render_1e308_renders(run_file, tmp_path):
    def huge(r):
        r["trajectory"]["snapshots"][1]["mean_gsnr"] = 1e308
        r["trajectory"]["snapshots"][1]["layer_gsnr"]["0.weight"] = 1e308
        r["trajectory"]["snapshots"][2]["train_loss"] = -1e308

    path = mutated(run_file, tmp_path, huge)
    result = invoke("render", path, "--out", tmp_path / "huge.html")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def test_render_infinity_is_refused(run_file, tmp_path):
    path = tmp_path / "inf.run.json"
    path.write_text(run_file.read_text().replace('"mean_gsnr": 0.1', '"mean_gsnr": Infinity', 1))
    assert_exit_2(invoke("render", path), "expected a finite number")


# ----------------------------------------------------------------------------- stats --weights
@pytest.fixture()
def tiny(tmp_path):
    return write(tmp_path / "tiny.py", TINY)


def test_stats_weights_empty_file(tiny, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_exit_2(invoke("stats", tiny, "--weights", tmp_path / "empty.pt"), "the file is empty")


def test_stats_weights_text_file(tiny, tmp_path):
    (tmp_path / "text.pt").write_text("hello\n")
    assert_exit_2(invoke("stats", tiny, "--weights", tmp_path / "text.pt"), "not a PyTorch checkpoint")


def test_stats_weights_dict_with_int_keys(tiny, tmp_path):
    torch.save({0: torch.ones(1)}, tmp_path / "intkey.pt")
    assert_exit_2(invoke("stats", tiny, "--weights", tmp_path / "intkey.pt"), "key(s) [0]")


# ----------------------------------------------------------------------------- unwritable outputs
def test_unwritable_out(run_file, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_exit_2(invoke("render", run_file, "--out", tmp_path / "afile" / "r.html"), "--out", "is a file")


def test_unwritable_pdf(run_file, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = invoke("render", run_file, "--out", tmp_path / "r.html", "--pdf", tmp_path / "afile" / "r.pdf")
    assert_exit_2(result, "--pdf", "is a file")
    assert not (tmp_path / "r.html").exists()  # refused before anything was written


def test_unwritable_run_json(tiny, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = invoke("report", tiny, "--out", tmp_path / "r.html", "--run-json", tmp_path / "afile" / "r.json")
    assert_exit_2(result, "--run-json", "is a file")


# ----------------------------------------------------------------------------- outputs never replace inputs
def test_report_out_is_the_model_file(tiny):
    before = tiny.read_text()
    assert_exit_2(invoke("report", tiny, "--out", tiny), "--out", "is the input MODEL_FILE")
    assert tiny.read_text() == before


def test_report_run_json_is_the_model_file(tiny, tmp_path):
    before = tiny.read_text()
    result = invoke("report", tiny, "--out", tmp_path / "r.html", "--run-json", tiny)
    assert_exit_2(result, "--run-json", "is the input MODEL_FILE")
    assert tiny.read_text() == before


def test_render_out_is_the_run_json(run_file):
    before = run_file.read_text()
    assert_exit_2(invoke("render", run_file, "--out", run_file), "is the input RUN_JSON")
    assert run_file.read_text() == before


def test_two_outputs_on_one_file(tiny, tmp_path):
    result = invoke("report", tiny, "--out", tmp_path / "x.html", "--run-json", tmp_path / "x.html")
    assert_exit_2(result, "is also the path of --out")


def test_output_suffix_of_another_kind_needs_force(run_file, tmp_path):
    out = tmp_path / "report.txt"
    assert_exit_2(invoke("render", run_file, "--out", out), "ends in '.txt'", "--force")
    assert not out.exists()
    assert invoke("render", run_file, "--out", out, "--force").exit_code == 0
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_existing_file_of_another_kind_needs_force(run_file, tmp_path):
    notes = tmp_path / "notes.html"
    notes.write_text("my notes, not a report\n")
    assert_exit_2(invoke("render", run_file, "--out", notes), "not an HTML report written by gsnr-diag")
    assert notes.read_text() == "my notes, not a report\n"


def test_existing_html_page_of_the_user_needs_force(run_file, tmp_path):
    page = tmp_path / "index.html"
    page.write_text("<!DOCTYPE html>\n<html><body>my own page</body></html>\n")
    assert_exit_2(invoke("render", run_file, "--out", page), "not an HTML report written by gsnr-diag")
    assert "my own page" in page.read_text()


def test_existing_report_is_replaced_without_force(run_file, tmp_path):
    out = tmp_path / "r.html"
    assert invoke("render", run_file, "--out", out).exit_code == 0
    assert invoke("render", run_file, "--out", out).exit_code == 0


# ----------------------------------------------------------------------------- model-file mistakes
def test_make_optimizer_returning_a_non_optimizer(tmp_path):
    model = write(tmp_path / "m.py", TINY + "\ndef make_optimizer(params):\n    return 'adam'\n")
    result = invoke("report", model, "--out", tmp_path / "r.html", "--no-control", "-q")
    assert_exit_2(result, "make_optimizer(params) returned str", "torch.optim.Optimizer")


def test_device_meta(tiny, tmp_path):
    assert_exit_2(invoke("report", tiny, "--out", tmp_path / "r.html", "--device", "meta"), "--device meta")
    assert_exit_2(invoke("stats", tiny, "--device", "meta"), "--device meta")


BROKEN_FORWARD = """
import torch
from torch import nn

EPOCHS = 1

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x):
        return self.layer(x) @ torch.ones(5, 5)   # the user's bug

def build_model():
    return Net()

def load_data():
    return torch.randn(32, 4), torch.randint(0, 3, (32,))
"""


def test_broken_forward_shows_the_users_traceback(tmp_path):
    model = write(tmp_path / "broken.py", BROKEN_FORWARD)
    for args in (("report", model, "--out", tmp_path / "r.html", "-q"), ("stats", model)):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("Error: ")
        assert f'File "{model.resolve()}", line 13, in forward' in result.output
        assert "the user's bug" in result.output
        assert "gsnr_diag" not in result.output.split("Your traceback:")[1]


def test_ctrl_c_during_the_final_render(tiny, tmp_path, monkeypatch):
    import gsnr_diag.report as report

    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "render_html", interrupted)
    result = invoke("report", tiny, "--out", tmp_path / "r.html", "--no-control", "-q")
    assert result.exit_code == 130, result.output
    assert "interrupted while writing the report; the run is saved in" in result.output
    assert "Traceback" not in result.output
    assert load_run(tmp_path / "r.run.json")["trajectory"]["snapshots"]


# ----------------------------------------------------------------------------- a DataLoader keeps its batches
LOADER = """
import torch
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

EPOCHS = 1

def build_model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

def load_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 4, generator=g)
    Y = (X[:, 0] > 0).long()
    sampler = SubsetRandomSampler(list(range(30)))   # only 30 of the 50 samples, 10 at a time
    return DataLoader(TensorDataset(X, Y), batch_size=10, sampler=sampler)
"""


def test_dataloader_keeps_its_batch_size_and_sampler(tmp_path):
    model = write(tmp_path / "loader.py", LOADER)
    result = invoke("report", model, "--out", tmp_path / "r.html", "--every", 1, "--no-control", "-q")
    assert result.exit_code == 0, result.output
    run = load_run(tmp_path / "r.run.json")
    assert run["metadata"]["settings"]["batch_size"] == 10
    assert [s["step"] for s in run["trajectory"]["snapshots"]] == [0, 1, 2, 3]  # 30 samples / 10
    result = invoke("report", model, "--out", tmp_path / "b.html", "--batch-size", 25, "--no-control", "-q")
    assert result.exit_code == 0, result.output
    run = load_run(tmp_path / "b.run.json")
    assert run["metadata"]["settings"]["batch_size"] == 25
    assert run["trajectory"]["snapshots"][-1]["step"] == 2  # --batch-size wins: 50 samples / 25


# ----------------------------------------------------------------------------- fuzzing the run-JSON loader
_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
_JSON = st.recursive(
    _LEAF, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)
_NUMBERS = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**30), 10**30)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:2]):
            yield from _paths(v, prefix + (i,))


_BASE = small_run()
_PATHS = [p for p in _paths(_BASE) if p]


def _mutate(run, changes):
    run = copy.deepcopy(run)
    for path, value in changes:
        target = run
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return run


_CHANGES = st.lists(st.tuples(st.sampled_from(_PATHS), _NUMBERS | _JSON), min_size=1, max_size=3)


def _fuzz(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@_fuzz(150)
@given(st.binary(max_size=200) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_loader_on_arbitrary_files(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "run.json"
    path.write_bytes(data)
    try:
        load_run(path)
    except TrajectoryFormatError:
        pass


@_fuzz(300)
@given(_CHANGES)
def test_fuzz_validation_of_mutated_runs(changes):
    try:
        run = _mutate(_BASE, changes)
    except (KeyError, IndexError, TypeError):
        return
    try:
        validate_run(run)
    except TrajectoryFormatError:
        return
    from gsnr_diag.report.verdicts import verdict_values

    verdict_values(run)  # what check and the report read, without drawing


def _renders_or_refuses(changes):
    try:
        run = _mutate(_BASE, changes)
    except (KeyError, IndexError, TypeError):
        return
    try:
        validate_run(run)
    except TrajectoryFormatError:
        return
    assert render_html(run).startswith("<!DOCTYPE html>")


@_fuzz(4)
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _NUMBERS), min_size=1, max_size=3))
def test_fuzz_valid_runs_render(changes):
    _renders_or_refuses(changes)


@pytest.mark.slow
@_fuzz(60)
@given(_CHANGES)
def test_fuzz_valid_runs_render_many(changes):
    _renders_or_refuses(changes)


def test_dollar_names_render_literally():
    run = small_run(layer="$\\frac{a$.weight", model="$x^2$")
    html = render_html(run)
    svgs = html[html.index("<svg") :]
    assert "$\\frac{a$.weight" in svgs  # drawn as written in a figure, not typeset as math


if sys.platform == "win32":  # pragma: no cover
    pytest.skip("paths in messages differ on Windows", allow_module_level=True)
