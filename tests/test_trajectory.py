"""Snapshot/Trajectory persistence: JSON round trip, JSONL (partial runs), schema errors, series."""

from __future__ import annotations

import json
import math

import pytest

from gsnr_diag.dynamics.trajectory import (
    SCHEMA_VERSION,
    Snapshot,
    Trajectory,
    TruncatedTrajectoryWarning,
    UnknownSeriesError,
    header_line,
    metadata_line,
    snapshot_line,
)
from gsnr_diag.errors import GsnrDiagError, TrajectoryFormatError


def _snap(step, g=0.5, **kw):
    return Snapshot(
        step=step,
        epoch=step / 10,
        mean_gsnr=g,
        gsnr_median=g / 2,
        gsnr_p90=2 * g,
        layer_gsnr={"0.weight": g, "0.bias": None},
        layer_same_sign={"0.weight": 0.55, "0.bias": None},
        osgr=0.9,
        mean_same_sign=0.52,
        opposite_sign=0.4,
        opposite_sign_top10=0.6,
        delta_g_weight_corr=None if step == 0 else -0.3,
        train_loss=1.0,
        test_loss=1.2,
        generalization_gap=0.2,
        train_accuracy=0.5,
        test_accuracy=0.4,
        elapsed=0.1 * step,
        undefined=3,
        extra={"lr": 0.1},
        **kw,
    )


def _traj(k=3):
    return Trajectory(
        [_snap(i * 5, g=0.1 * (i + 1)) for i in range(k)],
        {
            "model": "MLP",
            "param_counts": {"0.weight": 6},
            "n_train": 10,
            "task": "classification",
            "settings": {"epochs": 2, "lr": 0.1},
            "seed": 0,
        },
    )


def test_snapshot_round_trip_and_nan_becomes_none():
    s = _snap(3)
    assert Snapshot.from_dict(s.to_dict()) == s
    s.mean_gsnr = math.nan
    s.layer_gsnr["0.weight"] = math.inf
    d = s.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON
    assert d["mean_gsnr"] is None and d["layer_gsnr"]["0.weight"] is None


def test_trajectory_json_round_trip(tmp_path):
    t = _traj()
    path = t.save(tmp_path / "t.json")
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == SCHEMA_VERSION
    back = Trajectory.load(path)
    assert back == t
    assert Trajectory.from_dict(t.to_dict()) == t


def test_series_scalar_layer_and_extra():
    t = _traj()
    assert t.series("mean_gsnr") == ([0, 5, 10], [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)])
    steps, vals = t.series("layer_gsnr", layer="0.weight")
    assert steps == [0, 5, 10] and vals[2] == pytest.approx(0.3)
    assert t.series("layer_gsnr", layer="0.bias")[1] == [None, None, None]
    assert t.series("delta_g_weight_corr")[1][0] is None
    assert t.series("lr")[1] == [0.1, 0.1, 0.1]
    with pytest.raises(UnknownSeriesError, match="unknown quantity"):
        t.series("nope")
    with pytest.raises(GsnrDiagError, match="needs layer"):
        t.series("layer_gsnr")
    with pytest.raises(GsnrDiagError, match="no layer"):
        t.series("layer_gsnr", layer="9.weight")


def test_load_newer_version_and_malformed(tmp_path):
    p = tmp_path / "new.json"
    d = _traj().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    p.write_text(json.dumps(d))
    with pytest.raises(TrajectoryFormatError, match="newer"):
        Trajectory.load(p)
    p.write_text("{not json")
    with pytest.raises(TrajectoryFormatError, match="not valid JSON"):
        Trajectory.load(p)
    p.write_text(json.dumps({"schema_version": 1, "foo": []}))
    with pytest.raises(TrajectoryFormatError, match="snapshots"):
        Trajectory.load(p)
    p.write_text(json.dumps({"schema_version": 1, "snapshots": [{"mean_gsnr": 1.0}]}))
    with pytest.raises(TrajectoryFormatError, match="step"):
        Trajectory.load(p)
    p.write_text(json.dumps({"schema_version": 1, "snapshots": [{"step": 0, "mean_gsnr": "high"}]}))
    with pytest.raises(TrajectoryFormatError, match="mean_gsnr"):
        Trajectory.load(p)
    p.write_text("")
    with pytest.raises(TrajectoryFormatError, match="empty"):
        Trajectory.load(p)
    with pytest.raises(TrajectoryFormatError, match="no such file"):
        Trajectory.load(tmp_path / "missing.json")


def test_load_saved_run(tmp_path):
    t = _traj()
    p = tmp_path / "run.json"
    p.write_text(json.dumps({"schema_version": 1, "kind": "gsnr-diag-run", "trajectory": t.to_dict(), "control": None}))
    assert Trajectory.load(p) == t


def _write_jsonl(path, t, updates=()):
    lines = [header_line(t.metadata)] + [snapshot_line(s) for s in t.snapshots] + [metadata_line(u) for u in updates]
    path.write_text("\n".join(lines) + "\n")


def test_jsonl_round_trip_with_metadata_updates(tmp_path):
    t = _traj()
    p = tmp_path / "run.jsonl"
    _write_jsonl(p, t, updates=[{"stopped": "nan"}])
    back = Trajectory.load(p)
    assert back.snapshots == t.snapshots
    assert back.metadata["stopped"] == "nan" and back.metadata["model"] == "MLP"


def test_jsonl_truncated_last_line_is_skipped_with_warning(tmp_path):
    t = _traj()
    p = tmp_path / "run.jsonl"
    _write_jsonl(p, t)
    text = p.read_text()
    p.write_text(text + snapshot_line(_snap(99))[:40])  # a killed writer
    with pytest.warns(TruncatedTrajectoryWarning, match="truncated"):
        back = Trajectory.load(p)
    assert back.steps == [0, 5, 10]


def test_jsonl_malformed_middle_line_and_newer_header_raise(tmp_path):
    t = _traj()
    p = tmp_path / "run.jsonl"
    lines = [header_line(t.metadata), "{garbage", snapshot_line(t.snapshots[0])]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrajectoryFormatError, match="line 2"):
        Trajectory.load(p)
    head = json.loads(header_line({}))
    head["schema_version"] = SCHEMA_VERSION + 5
    p.write_text(json.dumps(head) + "\n")
    with pytest.raises(TrajectoryFormatError, match="newer"):
        Trajectory.load(p)
    p.write_text(snapshot_line(t.snapshots[0]) + "\n")
    with pytest.raises(TrajectoryFormatError, match="header"):
        Trajectory.load(p)
