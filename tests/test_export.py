"""Export to TensorBoard (read back with EventAccumulator) and offline W&B (its run file read back)."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from gsnr_diag import Monitor, Trajectory, train
from gsnr_diag.cli import main
from gsnr_diag.errors import ExportError


@pytest.fixture(scope="module")
def run_json(tmp_path_factory):
    torch.manual_seed(0)
    X, Y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    monitor = Monitor(model, (X[:48], Y[:48]), test_data=(X[48:], Y[48:]), every=2)
    traj = train(model, (X[:48], Y[:48]), epochs=6, lr=0.5, monitor=monitor, progress=False)
    path = tmp_path_factory.mktemp("run") / "run.json"
    traj.save(path)
    return path


def test_tensorboard_scalars_and_histograms_read_back(run_json, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = CliRunner().invoke(main, ["export", str(run_json), "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    traj = Trajectory.load(run_json)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("gsnr/mean_gsnr", "gsnr/osgr", "gsnr/same_sign", "gsnr/noise_scale", "gsnr/m_coherence"):
        assert tag in tags["scalars"], tag
    assert "layer_gsnr/0.weight" in tags["scalars"]
    assert "layer_noise_scale/2.weight" in tags["scalars"]
    events = acc.Scalars("gsnr/noise_scale")
    assert [e.step for e in events] == traj.steps
    for e, s in zip(events, traj.snapshots):
        assert e.value == pytest.approx(s.noise_scale, rel=1e-6)  # stored as float32
    hist = acc.Histograms("gsnr/log10_layer_gsnr")
    assert [h.step for h in hist] == traj.steps
    first = traj.snapshots[0]
    logs = [math.log10(v) for v in first.layer_gsnr.values()]
    assert hist[0].histogram_value.num == len(logs)
    assert hist[0].histogram_value.min == pytest.approx(min(logs), rel=1e-6)
    assert hist[0].histogram_value.max == pytest.approx(max(logs), rel=1e-6)
    for layer in first.layer_gsnr:  # per layer: log10 of the per-element GSNR, as kept in the snapshot
        per_layer = acc.Histograms(f"log10_gsnr/{layer}")
        assert [h.step for h in per_layer] == traj.steps
        for h, s in zip(per_layer, traj.snapshots):
            kept = s.layer_log10_gsnr_hist[layer]
            assert h.histogram_value.num == kept["num"]
            assert list(h.histogram_value.bucket) == kept["counts"]
            assert list(h.histogram_value.bucket_limit) == pytest.approx(kept["edges"][1:])


def _wandb_records(path):
    """Records of a W&B transaction log (LevelDB log format: 7-byte file header, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0:
            continue
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    records = []
    for raw in out:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def test_wandb_offline_run_holds_the_history(run_json, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    before = dict(os.environ)
    result = CliRunner().invoke(main, ["export", str(run_json), "--wandb", str(tmp_path / "wb"), "--name", "toy"])
    assert result.exit_code == 0, result.output
    ours = ("WANDB_MODE", "WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_SILENT")
    assert {k: os.environ.get(k) for k in ours} == {k: before.get(k) for k in ours}  # the offline settings undone
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    history = []
    for rec in _wandb_records(files[0]):
        if rec.WhichOneof("record_type") == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            )
    traj = Trajectory.load(run_json)
    assert [h["_step"] for h in history] == traj.steps
    for h, s in zip(history, traj.snapshots):
        assert h["gsnr/mean_gsnr"] == pytest.approx(s.mean_gsnr)
        assert h["gsnr/noise_scale"] == pytest.approx(s.noise_scale)
        assert h["layer_gsnr/0.weight"] == pytest.approx(s.layer_gsnr["0.weight"])
        kept = s.layer_log10_gsnr_hist["0.weight"]  # a histogram is stored as nested keys
        assert h["log10_gsnr/0.weight/_type"] == "histogram"
        assert h["log10_gsnr/0.weight/values"] == kept["counts"]
        assert h["log10_gsnr/0.weight/bins"] == pytest.approx(kept["edges"])


def test_monitor_on_snapshot_tensorboard_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gsnr_diag.integrations.export import TensorBoardLogger

    torch.manual_seed(0)
    X, Y = torch.randn(30, 4), torch.randint(0, 2, (30,))
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    logger = TensorBoardLogger(tmp_path / "live")
    monitor = Monitor(model, (X, Y), every=1, on_snapshot=logger)
    train(model, (X, Y), epochs=2, lr=0.1, monitor=monitor, progress=False)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "live"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("gsnr/mean_gsnr")] == monitor.trajectory.steps
    hist = acc.Histograms("log10_gsnr/0.weight")
    r = monitor.last_stats.gsnr["0.weight"]
    assert hist[-1].histogram_value.num == int((torch.isfinite(r) & (r > 0)).sum())


def test_export_bad_input_exits_2(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["export", str(tmp_path / "nope.json"), "--tensorboard", str(tmp_path / "tb")])
    assert missing.exit_code == 2 and "no such file" in missing.output
    (tmp_path / "x.json").write_text('{"schema_version": 1, "snapshots": []}')
    nothing = runner.invoke(main, ["export", str(tmp_path / "x.json")])
    assert nothing.exit_code == 2 and "--tensorboard" in nothing.output


def test_missing_package_is_a_named_error(monkeypatch, tmp_path):
    import builtins

    from gsnr_diag.integrations import export as ex

    real_import = builtins.__import__

    def fake_import(name, *args, **kw):
        if name == "wandb" or name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ExportError, match=r"gsnr-diag\[wandb\]"):
        ex.export_wandb(Trajectory(), tmp_path)
    with pytest.raises(ExportError, match=r"gsnr-diag\[tensorboard\]"):
        ex.export_tensorboard(Trajectory(), tmp_path)
