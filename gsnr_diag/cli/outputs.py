"""The CLI's output paths, checked before any work starts: an output never replaces an input or a file of
another kind, and an unwritable path is named at once rather than after training.

* an output equal to an input (``--out model.py``, ``render r.json --out r.json``) or to another output is
  always refused;
* an output whose name says another kind of file (``--out model.py`` for an HTML report), or an existing
  file at that path whose content is another kind (``--run-json notes.json`` holding your notes), is
  refused unless ``--force``;
* a path that cannot be written (a folder that cannot be created, a parent that is a file, no
  permission) is refused.

Every refusal is an :class:`~gsnr_diag.cli.common.InputError` (exit 2) naming the option and the path.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .common import InputError

__all__ = ["KINDS", "check_outputs", "same_file"]

#: kind → (what is written, accepted suffixes)
KINDS = {
    "html": ("an HTML report", (".html", ".htm")),
    "pdf": ("a PDF report", (".pdf",)),
    "run": ("the run JSON", (".json",)),
}


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (also through links and different spellings)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _content_matches(path: Path, kind: str) -> bool:
    """Whether the existing file at ``path`` is the kind of file gsnr-diag writes there (a previous output)."""
    try:
        if path.stat().st_size == 0:
            return True
        with open(path, "rb") as f:
            head = f.read(1 << 12)
    except OSError:
        return True  # unreadable: the write itself will say so
    if kind == "pdf":
        return head.startswith(b"%PDF")
    if kind == "html":  # the report templates carry <meta name="generator" content="gsnr-diag">
        return b'content="gsnr-diag"' in head
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError, OSError):
        return False
    return isinstance(d, dict) and d.get("kind") == "gsnr-diag-run"


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written, or ``None`` if it looks writable."""
    if path.is_dir():
        return "it is a directory"
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return f"{parent} is a file, not a folder"
    try:  # the honest test, also for root and special file systems: make (and remove) a file there
        fd, probe = tempfile.mkstemp(prefix=".gsnr-diag-probe-", dir=str(parent))
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"nothing can be created in the folder {parent}: {exc.strerror or exc}"
    if path.exists() and not os.access(path, os.W_OK):
        return "the file is not writable"
    return None


def check_outputs(inputs: dict[str, Path], outputs: dict[str, tuple[Path, str]], *, force: bool) -> None:
    """Refuse outputs that would destroy an input, clash, name another kind of file, or cannot be written.

    ``inputs`` maps a label (``"MODEL_FILE"``) to a path; ``outputs`` maps an option (``"--out"``) to
    ``(path, kind)`` with ``kind`` a key of :data:`KINDS`.
    """
    seen: dict[str, Path] = {}
    for option, (path, kind) in outputs.items():
        what, suffixes = KINDS[kind]
        for label, source in inputs.items():
            if same_file(path, source):
                raise InputError(
                    f"{option} {path} is the input {label}; writing {what} there would destroy it. "
                    f"Choose another path for {option}."
                )
        for other, other_path in seen.items():
            if same_file(path, other_path):
                raise InputError(f"{option} {path} is also the path of {other}; give each output its own file.")
        seen[option] = path
        why = _unwritable(path)
        if why is not None:
            raise InputError(f"{option} {path}: cannot be written ({why}); choose a writable path.")
        if force:
            continue
        if path.suffix.lower() not in suffixes:
            raise InputError(
                f"{option} {path}: {what} is written there, but the name ends in {path.suffix or '(no suffix)'!r}; "
                f"use a name ending in {' or '.join(suffixes)} (or pass --force to write it anyway)."
            )
        if path.exists() and not _content_matches(path, kind):
            raise InputError(
                f"{option} {path}: the file exists and is not {what} written by gsnr-diag; it was left "
                "untouched. Choose another path (or pass --force to replace it)."
            )
