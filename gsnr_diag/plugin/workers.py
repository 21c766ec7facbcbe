"""pytest-xdist: each worker hands its records to the controller, which writes the files and the summary.

Under ``pytest -n N`` the tests (and so the ``gsnr`` fixture) run in worker processes, while the terminal
summary, ``--gsnr-save`` and ``--gsnr-report`` belong to the controller. As pytest-benchmark and
pytest-html do, a worker puts what it recorded into ``config.workeroutput`` at the end of its session
(xdist sends that dict to the controller with its ``workerfinished`` event) and writes no file itself;
the controller merges each worker's records in ``pytest_testnodedown`` and writes everything once in its
own ``pytest_sessionfinish``, which runs after every worker has gone down.

The payload is one JSON string (execnet carries only builtin types): per test its node id, outcome,
checks, summary headline and one finished run dict per measurement (the run files' format). Imported only
by a worker that recorded something, or by the controller when a worker sends records.
"""

from __future__ import annotations

import json
from typing import Any

from .._io import to_plain
from .session import Check, GsnrSession, Measurement, TestRecord

__all__ = ["PAYLOAD_VERSION", "merge_payload", "worker_payload"]

PAYLOAD_VERSION = 1


def worker_payload(session: GsnrSession) -> str:
    """This worker's records (those that measured or checked something) as one JSON string."""
    records = [r for r in session.records.values() if r.measurements or r.checks]
    errors = list(session.errors)
    runs: list[list[dict[str, Any]]] = [[] for _ in records]
    if any(r.measurements for r in records):
        try:
            from .._io import environment_info
            from .files import measurement_run

            machine = environment_info(extra=("pytest",))
            runs = [[measurement_run(r, m, machine) for m in r.measurements] for r in records]
        except Exception as exc:  # a missing report dependency must not hide the test results
            errors.append(f"--gsnr-save/--gsnr-report (worker): {type(exc).__name__}: {exc}")
            runs = [[] for _ in records]
    out = []
    for rec, rec_runs in zip(records, runs):
        out.append(
            {
                "nodeid": rec.nodeid,
                "outcome": rec.outcome,
                "headline": rec.headline(),
                "checks": [_check_fields(c) for c in rec.checks],
                "measurements": [
                    {"kind": m.kind, "label": m.label, "run": run} for m, run in zip(rec.measurements, rec_runs)
                ],
            }
        )
    return json.dumps(to_plain({"version": PAYLOAD_VERSION, "records": out, "errors": errors}))


def _check_fields(c: Check) -> dict[str, Any]:
    return {
        "method": c.method,
        "quantity": c.quantity,
        "threshold": c.threshold,
        "measured": c.measured,
        "source": c.source,
        "passed": c.passed,
        "value": c.value,
    }


def merge_payload(session: GsnrSession, payload: str, worker: str = "worker") -> None:
    """Add one worker's records to the controller's session (a malformed payload becomes an error line)."""
    try:
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("version") != PAYLOAD_VERSION:
            raise ValueError(f"unknown payload version {data.get('version') if isinstance(data, dict) else data!r}")
        for item in data.get("records", []):
            _merge_record(session, item)
        session.errors.extend(str(e) for e in data.get("errors", []))
    except (ValueError, TypeError, KeyError) as exc:
        session.errors.append(f"the records of {worker}: {type(exc).__name__}: {exc}")


def _merge_record(session: GsnrSession, item: dict[str, Any]) -> None:
    rec = session.records.get(item["nodeid"])
    if rec is None:  # the same node id from two workers (--dist each) extends one record
        rec = session.records[item["nodeid"]] = TestRecord(item["nodeid"])
    rec.outcome = _worse(rec.outcome, item.get("outcome"))
    rec.checks.extend(Check(**c) for c in item.get("checks", []))
    for m in item.get("measurements", []):
        rec.measurements.append(Measurement(m["kind"], None, m.get("label"), run=m.get("run")))
    rec.remote_headline = item.get("headline")


_RANK = {None: 0, "skipped": 1, "passed": 2, "xfailed": 2, "xpassed": 3, "error": 4, "failed": 5}


def _worse(a: str | None, b: str | None) -> str | None:
    return a if _RANK.get(a, 3) >= _RANK.get(b, 3) else b
