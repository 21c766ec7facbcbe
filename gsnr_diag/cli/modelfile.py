"""Load a user's model file for the CLI: ``build_model()``, ``load_data()`` and optional settings.

A model file is a plain Python file::

    # model.py
    import torch
    from torch import nn

    EPOCHS = 5            # optional; CLI options override these constants
    LR = 0.05
    BATCH_SIZE = 64       # None = full-batch gradient descent
    TASK = "classification"   # or "regression"; inferred when absent

    def build_model():            # required: a freshly initialized nn.Module
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def load_data():              # required: train data, or a pair (train, test)
        X, Y = torch.randn(512, 64), torch.randint(0, 10, (512,))
        return (X[:400], Y[:400]), (X[400:], Y[400:])

    loss_fn = nn.CrossEntropyLoss()        # optional
    def make_optimizer(params):            # optional; default plain SGD at LR
        return torch.optim.SGD(params, lr=LR, momentum=0.9)

Errors in the file's *shape* (a missing name, a name of the wrong kind) raise
:class:`ModelFileError`, whose message says what is missing and shows the minimal example.
An exception raised *inside* the user's own code is wrapped in :class:`UserCodeError`, which
carries the user's traceback (our frames removed) for the CLI to print.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import GsnrDiagError

__all__ = [
    "ModelFileError",
    "UserCodeError",
    "ModelFile",
    "load_model_file",
    "call_user",
    "user_cause",
    "split_data",
    "MINIMAL_EXAMPLE",
]

MINIMAL_EXAMPLE = '''\
    # model.py — a minimal gsnr-diag model file
    import torch
    from torch import nn

    EPOCHS = 5          # optional: EPOCHS, LR, BATCH_SIZE, TASK, loss_fn, make_optimizer(params)

    def build_model():
        """Return a freshly initialized nn.Module."""
        return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))

    def load_data():
        """Return the training data, or a pair (train, test); e.g. tensors (X, Y)."""
        X, Y = torch.randn(600, 20), torch.randint(0, 3, (600,))
        return (X[:500], Y[:500]), (X[500:], Y[500:])
'''

TASKS = ("classification", "regression")

_HERE = os.path.dirname(os.path.abspath(__file__))


class ModelFileError(GsnrDiagError, ValueError):
    """The model file is missing, unreadable, or lacks a required name / has one of the wrong kind."""

    def __init__(self, message: str, *, example: bool = True):
        super().__init__(
            message + ("\n\nA minimal model file looks like this:\n\n" + MINIMAL_EXAMPLE if example else "")
        )


class UserCodeError(GsnrDiagError):
    """An exception raised inside the user's own code (importing the file, build_model(), load_data(), ...).

    ``user_traceback`` is the formatted traceback with gsnr-diag's and importlib's frames removed.
    """

    def __init__(self, where: str, exc: BaseException, user_traceback: str):
        self.where = where
        self.original = exc
        self.user_traceback = user_traceback
        super().__init__(f"{where} raised {type(exc).__name__}: {exc}")


def _is_ours(filename: str) -> bool:
    f = os.path.abspath(filename)
    return (
        f.startswith(_HERE + os.sep)
        or filename.startswith("<frozen importlib")
        or os.sep + "click" + os.sep in f
        or os.sep + "importlib" + os.sep in f
    )


def user_traceback(exc: BaseException, user_files: tuple[str, ...] = ()) -> str:
    """Format ``exc`` with its traceback cut to the user's frames.

    Frames before the first frame outside gsnr-diag/importlib/click are dropped (our
    calling code); when ``user_files`` is given and the traceback never enters them, the
    whole traceback is kept (it is then not the user's error).
    """
    tb = exc.__traceback__
    frames = traceback.extract_tb(tb)
    start = None
    for i, fr in enumerate(frames):
        if user_files and os.path.abspath(fr.filename) in user_files:
            start = i
            break
        if not user_files and not _is_ours(fr.filename):
            start = i
            break
    if start is None:
        start = 0
    # walk the real traceback object to the start frame so the chained output is right
    for _ in range(start):
        if tb is not None:
            tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def traceback_enters(exc: BaseException, files: tuple[str, ...]) -> bool:
    """Whether any frame of ``exc``'s traceback is in one of ``files`` (absolute paths)."""
    return any(os.path.abspath(fr.filename) in files for fr in traceback.extract_tb(exc.__traceback__))


def user_cause(exc: BaseException, files: tuple[str, ...]) -> BaseException | None:
    """The first exception in ``exc``'s cause/context chain raised through one of ``files``, if any.

    gsnr-diag wraps a failure of the user's ``forward`` in a :class:`~gsnr_diag.errors.ModelError`
    (saying which chunk failed); the user's own traceback is on the wrapped exception.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if traceback_enters(current, files):
            return current
        current = current.__cause__ or current.__context__
    return None


def call_user(fn: Callable[..., Any], where: str, *args: Any, user_files: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Call user code; a non-gsnr-diag exception becomes :class:`UserCodeError` with the user's traceback."""
    try:
        return fn(*args, **kwargs)
    except GsnrDiagError:
        raise
    except Exception as exc:  # re-raised with the user's traceback
        raise UserCodeError(where, exc, user_traceback(exc, user_files)) from exc


@dataclass
class ModelFile:
    """What a model file defines (``None`` where the optional name is absent)."""

    path: Path
    name: str
    module: ModuleType
    build_model: Callable[[], Any]
    load_data: Callable[[], Any]
    loss_fn: Callable[..., Any] | None = None
    make_optimizer: Callable[..., Any] | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    batch_size_given: bool = False
    task: str | None = None
    settings_from_file: dict[str, Any] = field(default_factory=dict)

    @property
    def user_files(self) -> tuple[str, ...]:
        return (str(self.path.resolve()),)

    def build(self) -> Any:
        """``build_model()``, checked to return an ``nn.Module``."""
        from torch import nn

        model = call_user(self.build_model, f"build_model() in {self.path.name}", user_files=self.user_files)
        if not isinstance(model, nn.Module):
            raise ModelFileError(
                f"{self.path}: build_model() returned a {type(model).__name__}; it must return a freshly "
                "initialized torch.nn.Module"
            )
        return model

    def data(self) -> tuple[Any, Any]:
        """``load_data()`` split into ``(train, test)`` (``test`` may be ``None``)."""
        value = call_user(self.load_data, f"load_data() in {self.path.name}", user_files=self.user_files)
        return split_data(value, self.path)


def split_data(value: Any, path: Path | str = "model file") -> tuple[Any, Any]:
    """Interpret ``load_data()``'s result as ``(train, test)``.

    A pair of tensors ``(X, Y)`` is training data alone; a pair whose items are themselves
    data (tuples, DataLoaders, Datasets, iterables) is ``(train, test)``.
    """
    import torch
    from torch.utils.data import DataLoader, Dataset

    if value is None:
        raise ModelFileError(f"{path}: load_data() returned None; it must return the training data or (train, test)")

    def is_data(x: Any) -> bool:
        return isinstance(x, (tuple, list, DataLoader, Dataset)) or (
            hasattr(x, "__iter__") and not isinstance(x, (torch.Tensor, str, bytes, dict))
        )

    if isinstance(value, dict):
        if "train" in value:
            return value["train"], value.get("test")
        raise ModelFileError(
            f"{path}: load_data() returned a dict without a 'train' key; "
            "return the training data or a pair (train, test)"
        )
    if isinstance(value, (tuple, list)) and len(value) == 2:
        a, b = value
        if isinstance(b, torch.Tensor):
            return value, None  # (X, Y)
        if (is_data(a) or a is None) and (is_data(b) or b is None) and not isinstance(a, torch.Tensor):
            if a is None:
                raise ModelFileError(f"{path}: load_data() returned (None, test); the training data is required")
            return a, b
    return value, None


def _load_module(path: Path) -> ModuleType:
    name = "gsnr_diag_user_model_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{path}: cannot be imported as a Python file (expected a .py file)", example=False)
    module = importlib.util.module_from_spec(spec)
    # Let the file import siblings next to it (helpers, a local package), like `python model.py` would.
    parent = str(path.parent.resolve())
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)
    sys.modules[name] = module
    try:
        call_user(spec.loader.exec_module, f"importing {path.name}", module, user_files=(str(path.resolve()),))
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if added:
            try:
                sys.path.remove(parent)
            except ValueError:
                pass
    return module


def _positive_int(value: Any, name: str, path: Path, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        kind = "a positive int or None" if allow_none else "a positive int"
        raise ModelFileError(f"{path}: {name} = {value!r}; expected {kind}")
    return value


def load_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Import ``path`` and check the names it defines (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file", example=False)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a directory; pass a Python model file", example=False)
    if path.suffix != ".py":
        raise ModelFileError(f"{path}: expected a Python file ending in .py")
    module = _load_module(path)
    ns = vars(module)

    missing = [n for n in ("build_model", "load_data") if n not in ns]
    if missing:
        defined = sorted(n for n in ns if not n.startswith("_") and callable(ns[n]))[:10]
        raise ModelFileError(
            f"{path}: missing required name{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
            + (f" (callables it defines: {', '.join(defined)})" if defined else "")
        )
    for n in ("build_model", "load_data"):
        if not callable(ns[n]):
            raise ModelFileError(f"{path}: {n} is a {type(ns[n]).__name__}; it must be a function taking no arguments")
    for n in ("loss_fn", "make_optimizer"):
        if ns.get(n) is not None and not callable(ns[n]):
            raise ModelFileError(f"{path}: {n} is a {type(ns[n]).__name__}; it must be callable")

    epochs = _positive_int(ns["EPOCHS"], "EPOCHS", path) if "EPOCHS" in ns else None
    lr = None
    if "LR" in ns:
        lr = ns["LR"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ModelFileError(f"{path}: LR = {lr!r}; expected a positive number")
        lr = float(lr)
    batch_size_given = "BATCH_SIZE" in ns
    batch_size = _positive_int(ns["BATCH_SIZE"], "BATCH_SIZE", path, allow_none=True) if batch_size_given else None
    task = ns.get("TASK")
    if task is not None and task not in TASKS:
        raise ModelFileError(f"{path}: TASK = {task!r}; expected 'classification' or 'regression'")
    settings = {k: ns[k] for k in ("EPOCHS", "LR", "BATCH_SIZE", "TASK") if k in ns}
    return ModelFile(
        path=path,
        name=path.stem,
        module=module,
        build_model=ns["build_model"],
        load_data=ns["load_data"],
        loss_fn=ns.get("loss_fn"),
        make_optimizer=ns.get("make_optimizer"),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        batch_size_given=batch_size_given,
        task=task,
        settings_from_file=settings,
    )
