"""Nothing a user made is lost: Monitor and trajectory files, the run JSON, the CLI's outputs, the control.

One test per case: a Monitor never empties an existing file (it resumes the same run's JSONL and refuses
anything else), files go to missing folders or fail with a named error, a failed rerun never replaces a
complete run JSON, an output never overwrites an input, and an interrupted control keeps what it recorded.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gsnr_diag import Monitor, Trajectory
from gsnr_diag.dynamics.trajectory import TruncatedTrajectoryWarning
from gsnr_diag.errors import MonitorError, OutputError


def _setup(out=2):
    torch.manual_seed(0)
    model = nn.Linear(3, out)
    X, Y = torch.randn(24, 3), torch.randint(0, out, (24,))
    return model, (X, Y)


# ----------------------------------------------------------------------------- Monitor(path=...)
def test_monitor_refuses_an_unrelated_file_and_leaves_it_untouched(tmp_path):
    precious = tmp_path / "precious.py"
    precious.write_text("print('my work')\n")
    model, data = _setup()
    with pytest.raises(MonitorError, match="precious.py.*not a gsnr-diag JSONL.*left untouched.*overwrite=True"):
        Monitor(model, data, path=precious)
    assert precious.read_text() == "print('my work')\n"


def test_monitor_resumes_the_same_runs_jsonl_and_appends(tmp_path):
    path = tmp_path / "run.jsonl"
    model, data = _setup()
    first = Monitor(model, data, path=path)
    first.record(0)
    first.record(1)
    before = path.read_text()
    again = Monitor(model, data, path=path)
    assert path.read_text() == before  # opening never truncates
    assert again.trajectory.steps == [0, 1]
    again.record(2)
    assert Trajectory.load(path).steps == [0, 1, 2]
    assert again.trajectory.steps == [0, 1, 2]


def test_monitor_resume_refuses_an_earlier_step(tmp_path):
    path = tmp_path / "run.jsonl"
    model, data = _setup()
    Monitor(model, data, path=path).record(3)
    again = Monitor(model, data, path=path)
    with pytest.raises(MonitorError, match="up to step 3"):
        again.record(0)
    assert Trajectory.load(path).steps == [3]


def test_monitor_refuses_another_runs_jsonl(tmp_path):
    path = tmp_path / "run.jsonl"
    model, data = _setup()
    Monitor(model, data, path=path).record(0)
    before = path.read_text()
    other, other_data = _setup(out=4)
    with pytest.raises(MonitorError, match="different run"):
        Monitor(other, other_data, path=path)
    assert path.read_text() == before


def test_monitor_refuses_a_saved_json_trajectory(tmp_path):
    model, data = _setup()
    mon = Monitor(model, data)
    mon.record(0)
    saved = mon.trajectory.save(tmp_path / "t.json")
    before = saved.read_text()
    with pytest.raises(MonitorError, match="not a gsnr-diag JSONL"):
        Monitor(model, data, path=saved)
    assert saved.read_text() == before


def test_monitor_overwrite_true_replaces_the_file(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text("not mine any more\n")
    model, data = _setup()
    mon = Monitor(model, data, path=path, overwrite=True)
    mon.record(0)
    assert Trajectory.load(path).steps == [0]


def test_monitor_resume_drops_a_cut_off_last_line(tmp_path):
    path = tmp_path / "run.jsonl"
    model, data = _setup()
    Monitor(model, data, path=path).record(0)
    with open(path, "a") as f:
        f.write('{"snapshot": {"step": 1, "mean_gs')  # a writer killed mid-line
    with pytest.warns(TruncatedTrajectoryWarning):
        again = Monitor(model, data, path=path)
    again.record(1)
    assert Trajectory.load(path).steps == [0, 1]


def test_monitor_creates_missing_folders(tmp_path):
    model, data = _setup()
    path = tmp_path / "new" / "deeper" / "run.jsonl"
    Monitor(model, data, path=path).record(0)
    assert Trajectory.load(path).steps == [0]


def test_monitor_path_through_a_file_is_a_monitor_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    model, data = _setup()
    with pytest.raises(MonitorError, match="afile is a file, not a folder"):
        Monitor(model, data, path=tmp_path / "afile" / "run.jsonl")


def test_monitor_path_that_is_a_directory_is_a_monitor_error(tmp_path):
    model, data = _setup()
    with pytest.raises(MonitorError, match="is a directory"):
        Monitor(model, data, path=tmp_path)


def test_record_refuses_a_tensor_of_several_numbers(tmp_path):
    model, data = _setup()
    mon = Monitor(model, data)
    with pytest.raises(MonitorError, match=r"record\(lr=...\): expected a single number.*shape \(3,\)"):
        mon.record(0, lr=torch.ones(3))
    assert mon.record(0, lr=torch.tensor(0.5)).extra["lr"] == 0.5


# ----------------------------------------------------------------------------- Trajectory.save
def test_trajectory_save_creates_missing_folders(tmp_path):
    model, data = _setup()
    mon = Monitor(model, data)
    mon.record(0)
    path = mon.trajectory.save(tmp_path / "missing" / "dir" / "t.json")
    assert Trajectory.load(path).steps == [0]


def test_trajectory_save_through_a_file_is_an_output_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile is a file, not a folder"):
        Trajectory().save(tmp_path / "afile" / "t.json")
    assert (tmp_path / "afile").read_text() == "x"


def test_trajectory_save_onto_a_directory_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        Trajectory().save(tmp_path)
    assert json.loads(json.dumps(Trajectory().to_dict()))["snapshots"] == []


# ----------------------------------------------------------------------------- the run JSON of `gsnr-diag report`
TINY = """
import os
import torch
from torch import nn

EPOCHS = 2
LR = 0.2
BATCH_SIZE = 16
CALLS = 0
STOP = int(os.environ.get("GSNR_TEST_STOP_AT", "0"))  # forward calls before a Ctrl-C (0: never)
BREAK = os.environ.get("GSNR_TEST_BREAK") == "1"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        global CALLS
        CALLS += 1
        if BREAK:
            raise RuntimeError("broken on purpose")
        if STOP and CALLS >= STOP:
            raise KeyboardInterrupt
        return self.body(x)


def build_model():
    return Net()


def load_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g)
    Y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return (X[:48], Y[:48]), (X[48:], Y[48:])
"""


def _report(tmp_path, *args, env=None, monkeypatch=None):
    import sys

    from click.testing import CliRunner

    from gsnr_diag.cli import main

    sys.modules.pop("gsnr_diag_user_model_tiny", None)
    model = tmp_path / "tiny.py"
    if not model.exists():
        model.write_text(TINY)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(main, ["report", str(model), "--out", str(tmp_path / "r.html"), "-q", *args])
    for k in env or {}:
        monkeypatch.delenv(k)
    return result


def test_failed_rerun_keeps_the_complete_run_json(tmp_path, monkeypatch):
    first = _report(tmp_path, "--no-control")
    assert first.exit_code == 0, first.output
    run_json = tmp_path / "r.run.json"
    html = tmp_path / "r.html"
    kept, kept_html = run_json.read_bytes(), html.read_bytes()
    again = _report(tmp_path, "--no-control", env={"GSNR_TEST_BREAK": "1"}, monkeypatch=monkeypatch)
    assert again.exit_code == 2, again.output
    assert run_json.read_bytes() == kept and html.read_bytes() == kept_html
    side = json.loads((tmp_path / "r.run.incomplete.json").read_text())
    assert side["trajectory"] is None and side["metadata"]["partial"] is True


def test_interrupted_rerun_keeps_the_complete_run_and_saves_its_own_progress(tmp_path, monkeypatch):
    assert _report(tmp_path, "--no-control").exit_code == 0
    run_json = tmp_path / "r.run.json"
    kept = run_json.read_bytes()
    again = _report(tmp_path, "--no-control", env={"GSNR_TEST_STOP_AT": "40"}, monkeypatch=monkeypatch)
    assert again.exit_code == 130, again.output
    assert "r.run.incomplete.json" in again.output
    assert run_json.read_bytes() == kept
    assert json.loads((tmp_path / "r.run.incomplete.json").read_text())["trajectory"]["snapshots"]


def test_finished_rerun_replaces_the_run_json_and_removes_its_incomplete_file(tmp_path, monkeypatch):
    assert _report(tmp_path, "--no-control").exit_code == 0
    assert _report(tmp_path, "--no-control", env={"GSNR_TEST_BREAK": "1"}, monkeypatch=monkeypatch).exit_code == 2
    assert (tmp_path / "r.run.incomplete.json").exists()
    assert _report(tmp_path, "--no-control", "--epochs", "1").exit_code == 0
    run = json.loads((tmp_path / "r.run.json").read_text())
    assert run["metadata"]["settings"]["epochs"] == 1 and not run["metadata"].get("partial")


def test_interrupted_control_keeps_both_runs_and_renders_partially(tmp_path, monkeypatch):
    import sys

    full = _report(tmp_path, "--every", "1")
    assert full.exit_code == 0, full.output
    calls = sys.modules["gsnr_diag_user_model_tiny"].CALLS
    (tmp_path / "r.run.json").unlink()
    (tmp_path / "r.html").unlink()
    stop = int(calls * 0.8)  # inside the shuffled-label run, which comes second
    result = _report(tmp_path, "--every", "1", env={"GSNR_TEST_STOP_AT": str(stop)}, monkeypatch=monkeypatch)
    assert result.exit_code == 130, result.output
    run = json.loads((tmp_path / "r.run.json").read_text())
    control = run["control"]
    assert control is not None and control["partial"] is True
    real, shuffled = control["real"]["snapshots"], control["shuffled"]["snapshots"]
    assert len(shuffled) >= 2 and shuffled[-1]["step"] < real[-1]["step"]
    assert run["trajectory"]["snapshots"] == real
    from click.testing import CliRunner

    from gsnr_diag.cli import main

    rendered = CliRunner().invoke(main, ["render", str(tmp_path / "r.run.json"), "-q"])
    assert rendered.exit_code == 0, rendered.output
    html = (tmp_path / "r.html").read_text()
    assert "The shuffled-label control did not finish" in html and "This run did not finish" in html


# ----------------------------------------------------------------------------- a diverging run keeps its trajectory
def test_diverging_run_warns_and_keeps_the_trajectory():
    from gsnr_diag import train
    from gsnr_diag.dynamics.training import NonFiniteLossWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    X = torch.randn(64, 4)
    data = (X, X[:, :1] * 3)
    monitor = Monitor(model, data, nn.MSELoss(), every=1)
    with pytest.warns(NonFiniteLossWarning, match="diverged|the loss is"):
        traj = train(model, data, nn.MSELoss(), epochs=30, lr=1e6, batch_size=16, monitor=monitor, progress=False)
    assert len(traj) >= 1 and traj.steps[0] == 0
    assert "training stopped" in traj.metadata["stopped"]


def test_trajectory_load_of_deeply_nested_json(tmp_path):
    from gsnr_diag.errors import TrajectoryFormatError

    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TrajectoryFormatError, match="nested too deeply"):
        Trajectory.load(path)


@pytest.mark.slow
def test_sigkilled_control_keeps_both_runs(tmp_path):
    """SIGKILL while the shuffled-label run trains: the run JSON already holds both runs' snapshots."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model = tmp_path / "slow.py"
    model.write_text(
        TINY.replace("EPOCHS = 2", "EPOCHS = 400").replace(
            "        return self.body(x)", "        __import__('time').sleep(0.001)\n        return self.body(x)"
        )
    )
    run_json = tmp_path / "r.run.json"
    cli = "import sys; from gsnr_diag.cli import main; sys.argv[0] = 'gsnr-diag'; main()"
    cmd = [sys.executable, "-c", cli, "report", str(model), "--out", str(tmp_path / "r.html")]
    proc = subprocess.Popen([*cmd, "--every", "40", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                control = json.loads(run_json.read_text()).get("control")
            except (OSError, ValueError):
                continue
            if control and len(control["shuffled"]["snapshots"]) >= 2:
                break
        assert proc.poll() is None, "the report finished before the control could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = json.loads(run_json.read_text())
    assert run["metadata"]["partial"] is True and run["control"]["partial"] is True
    assert len(run["control"]["shuffled"]["snapshots"]) >= 2
    assert run["control"]["shuffled"]["snapshots"][-1]["step"] < run["control"]["real"]["snapshots"][-1]["step"]


def test_fuzz_trajectory_load_refuses_with_a_named_error(tmp_path_factory):
    """Arbitrary bytes and JSON(L) given to Trajectory.load (and to Monitor(path=...)): only named errors."""
    import warnings

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from gsnr_diag.errors import TrajectoryFormatError

    leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
    keys = st.sampled_from(["snapshot", "metadata", "step", "mean_gsnr", "layer_gsnr", "extra"]) | st.text(max_size=5)
    values = st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(keys, c), max_leaves=6)
    header = '{"schema_version": 1, "kind": "gsnr-diag-trajectory-header", "metadata": {}}\n'
    lines = st.lists(values.map(json.dumps), max_size=4).map(lambda ls: header + "\n".join(ls))
    model, data = _setup()

    @settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=120).map(lambda b: b.decode("latin-1")) | lines, st.sampled_from([".json", ".jsonl"]))
    def check(text, suffix):
        path = tmp_path_factory.mktemp("t") / ("run" + suffix)
        path.write_text(text, encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                Trajectory.load(path)
            except TrajectoryFormatError:
                pass
            try:
                Monitor(model, data, path=path)
            except MonitorError:
                pass

    check()
