"""The edges of the library that touch files and JSON: plain values, atomic writes, schema versions.

No torch import here (the pytest plugin and the report use it): tensors and numpy scalars are
converted through their ``item()`` / ``tolist()`` methods.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from .errors import OutputError, TrajectoryFormatError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "check_schema_version",
    "clean_float",
    "environment_info",
    "to_plain",
    "why_unwritable",
    "write_json",
]


def clean_float(x: Any) -> float | None:
    """A finite Python float, or ``None`` for ``None``/bool/NaN/inf/non-numbers (JSON has no NaN)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def to_plain(obj: Any) -> Any:
    """A JSON-ready copy: ``to_dict()`` objects converted, NaN/inf → ``None``, tuples → lists, others → str."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_plain(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays / torch tensors, scalars included
        try:
            return to_plain(obj.tolist())
        except (TypeError, ValueError, RuntimeError):
            pass
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return to_plain(obj.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    if hasattr(obj, "__float__"):
        try:
            return clean_float(float(obj))
        except (TypeError, ValueError):
            pass
    return str(obj)


def why_unwritable(path: str | os.PathLike[str], exc: OSError) -> str:
    """A short reason why ``path`` could not be written, naming a parent that is a file rather than a folder."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            break
    return exc.strerror or str(exc)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, renamed into place.

    A crash never leaves half a file, and the file gets ordinary permissions (``mkstemp`` makes 0600).
    Missing folders are created; a path that cannot be written raises :class:`~gsnr_diag.errors.OutputError`
    naming it (the previous file, if any, is untouched).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; pass a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=str(path.parent))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write there ({why_unwritable(path, exc)}); choose a writable path") from exc
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            why = why_unwritable(path, exc)
            raise OutputError(f"{path}: cannot write it ({why}); the previous file is untouched") from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` as UTF-8 through :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """``obj`` as indented JSON (through :func:`to_plain`), written atomically."""
    return atomic_write_text(path, json.dumps(to_plain(obj), indent=1, allow_nan=False) + "\n")


def check_schema_version(d: dict[str, Any], supported: int, what: str) -> int:
    """The integer ``schema_version`` of ``d``; :class:`TrajectoryFormatError` if missing, invalid or too new."""
    version = d.get("schema_version")
    if version is None:
        raise TrajectoryFormatError(f"{what}: no 'schema_version'; not a gsnr-diag file?")
    if not isinstance(version, int) or isinstance(version, bool):
        raise TrajectoryFormatError(f"{what}: schema_version {version!r} is not an integer")
    if version > supported:
        raise TrajectoryFormatError(
            f"{what}: schema_version {version} is newer than this gsnr-diag understands ({supported}); "
            "upgrade gsnr-diag to read it"
        )
    return version


def environment_info(extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Platform and versions of python, torch, opacus, gsnr_diag (and ``extra`` modules), for saved results.

    Versions come from already-imported modules or package metadata, so this imports nothing heavy.
    """
    from importlib import metadata

    from ._version import __version__

    versions: dict[str, str | None] = {"python": platform.python_version(), "gsnr_diag": __version__}
    for mod in ("torch", "opacus", *extra):
        m = sys.modules.get(mod)
        version = getattr(m, "__version__", None) if m is not None else None
        if version is None:
            try:
                version = metadata.version(mod)
            except metadata.PackageNotFoundError:
                version = None
        versions[mod] = str(version) if version is not None else None
    return {"platform": platform.platform(), "machine": platform.machine(), "versions": versions}
