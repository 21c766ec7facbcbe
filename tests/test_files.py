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
