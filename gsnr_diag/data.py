"""Turn any supported data form into chunks of ``(x, y)`` on a device.

Supported forms:

* a :class:`torch.utils.data.DataLoader`;
* a map-style :class:`~torch.utils.data.Dataset` of ``(x, y)`` pairs;
* a tuple ``(X, Y)`` of tensors with equal first dimension;
* any iterable of ``(x, y)`` batches.

``x`` may be a tensor, a tuple/list of tensors (positional inputs) or a dict of tensors
(keyword inputs). With ``batch_size`` the stream is re-chunked to exactly that many
samples per chunk (the last one may be smaller), so memory is bounded by one chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import DataError

Inputs = Any  # Tensor | tuple[Tensor, ...] | dict[str, Tensor]
Batch = tuple[Inputs, torch.Tensor]

DEFAULT_BATCH_SIZE = 256

_FORMS = (
    "a DataLoader, a Dataset of (x, y) pairs, a tuple (X, Y) of tensors with equal first "
    "dimension, or an iterable of (x, y) batches"
)


_AS_TENSORS = "data=(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(Y))"
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def _array_like(v: Any) -> bool:
    """A NumPy array or a pandas / array-library object that is not a tensor."""
    if isinstance(v, torch.Tensor):
        return False
    return isinstance(v, np.ndarray) or (hasattr(v, "__array__") and hasattr(v, "shape"))


def _describe_array(v: Any) -> str:
    return f"{type(v).__module__.split('.')[0]}.{type(v).__name__} of shape {tuple(getattr(v, 'shape', ()))}"


def _dict_hint(d: Mapping, name: str = "batch") -> str:
    keys = list(d)
    label = next((k for k in _LABEL_KEYS if k in d), None)
    if label is None:
        return f"keys {keys[:8]!r}"
    return (
        f"keys {keys[:8]!r}; split it into (inputs, targets), e.g. "
        f"({{k: v for k, v in {name}.items() if k != {label!r}}}, {name}[{label!r}])"
    )


def check_reiterable(data: Any, what: str, why: str) -> None:
    """Refuse a generator or other one-shot iterator where ``data`` is read more than once."""
    if isinstance(data, Iterator):
        raise DataError(
            f"{what}: a {type(data).__name__} can be read only once, but {why}; pass a list of (x, y) batches, "
            "a tuple (X, Y) of tensors or a DataLoader, which can be read again"
        )


def tree_map(fn: Callable[[torch.Tensor], Any], x: Inputs) -> Inputs:
    """Apply ``fn`` to every tensor in a tensor / tuple / list / dict structure."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(fn, v) for v in x)
    return x


def tensor_leaves(x: Inputs) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    tree_map(lambda t: out.append(t), x)
    return out


def batch_len(batch: Batch) -> int:
    """Number of samples in a batch (the first dimension of ``y``)."""
    _, y = batch
    return int(y.shape[0]) if y.ndim > 0 else 1


def _check_batch(item: Any, index: int) -> Batch:
    if _array_like(item):
        raise DataError(
            f"data: batch {index} is a {_describe_array(item)}; expected a pair (x, y) of torch tensors. "
            f"Convert the arrays first, e.g. {_AS_TENSORS}, or yield (torch.as_tensor(x), torch.as_tensor(y))"
        )
    if isinstance(item, Mapping):
        raise DataError(f"data: batch {index} is a dict with {_dict_hint(item)}; expected a pair (x, y)")
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        kind = type(item).__name__
        extra = f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""
        raise DataError(
            f"data: batch {index} is a {kind}{extra}; expected a pair (x, y). Supported data forms: {_FORMS}."
        )
    x, y = item
    if not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except Exception as exc:
            raise DataError(f"data: the target y of batch {index} is a {type(y).__name__}, expected a tensor") from exc
    if y.ndim == 0:
        raise DataError(
            f"data: the target y of batch {index} is a scalar; batches need a leading sample dimension "
            "(did you pass a single sample instead of a batch?)"
        )
    leaves = tensor_leaves(x)
    if not leaves and _array_like(x):
        raise DataError(
            f"data: the input x of batch {index} is a {_describe_array(x)}, expected a torch tensor; "
            f"convert it first, e.g. {_AS_TENSORS}"
        )
    if not leaves:
        raise DataError(
            f"data: the input x of batch {index} is a {type(x).__name__} holding no tensors; "
            "expected a tensor, a tuple of tensors or a dict of tensors"
        )
    n = y.shape[0]
    for t in leaves:
        if t.ndim == 0 or t.shape[0] != n:
            raise DataError(
                f"data: batch {index} has inputs with first dimension {tuple(t.shape)[:1]} but {n} targets; "
                "every input tensor and the target must share the sample (first) dimension"
            )
    return x, y


def _raw_batches(data: Any, batch_size: int | None) -> Iterator[Batch]:
    if isinstance(data, DataLoader):
        yield from (_check_batch(b, i) for i, b in enumerate(data))
        return
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and isinstance(data[0], (torch.Tensor, Mapping, tuple, list))  # X: a tensor, a dict or a tuple of tensors
        and all(isinstance(t, torch.Tensor) for t in tensor_leaves(data[0]))
        and tensor_leaves(data[0])
    ):
        x, y = _check_batch(tuple(data), 0)
        n = y.shape[0]
        step = batch_size or DEFAULT_BATCH_SIZE
        for start in range(0, n, step):
            yield tree_map(lambda t: t[start : start + step], x), y[start : start + step]
        return
    if isinstance(data, Dataset) and hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        loader = DataLoader(data, batch_size=batch_size or DEFAULT_BATCH_SIZE, shuffle=False)
        yield from (_check_batch(b, i) for i, b in enumerate(loader))
        return
    if isinstance(data, torch.Tensor):
        raise DataError(
            f"data: got a single tensor; gsnr-diag needs targets too. Pass a tuple (X, Y), or one of: {_FORMS}."
        )
    if _array_like(data):
        raise DataError(
            f"data: got a {_describe_array(data)}; gsnr-diag needs inputs and targets as torch tensors: {_AS_TENSORS}"
        )
    if isinstance(data, (tuple, list)) and len(data) == 2 and any(_array_like(v) for v in data):
        parts = ", ".join(
            f"{n} is a {_describe_array(v) if _array_like(v) else type(v).__name__}" for n, v in zip("XY", data)
        )
        raise DataError(f"data: (X, Y) holds arrays that are not torch tensors ({parts}); convert them: {_AS_TENSORS}")
    if isinstance(data, Mapping):
        raise DataError(
            f"data: got a dict with {_dict_hint(data, 'data')}; or pass a tuple (X, Y) of tensors "
            f"(X may be a dict of input tensors, for a model called with keyword arguments), or one of: {_FORMS}."
        )
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DataError(f"data: got a {type(data).__name__}; expected {_FORMS}.")
    seen = 0
    for i, b in enumerate(data):
        seen += 1
        yield _check_batch(b, i)
    if not seen and isinstance(data, Iterator):
        raise DataError(
            f"data: the {type(data).__name__} yielded no batches: a generator or iterator can be read only once, "
            "and this one is used up (or empty). Pass a fresh one, or a list of (x, y) batches, a tuple (X, Y) "
            "or a DataLoader, which can be read again"
        )


def _cat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    xs = [p[0] for p in parts]
    first = xs[0]

    def cat_like(path_getter):
        return torch.cat([path_getter(x) for x in xs])

    if isinstance(first, torch.Tensor):
        x = torch.cat(xs)
    elif isinstance(first, Mapping):
        x = {k: (torch.cat([xx[k] for xx in xs]) if isinstance(v, torch.Tensor) else v) for k, v in first.items()}
    else:
        x = type(first)(
            torch.cat([xx[i] for xx in xs]) if isinstance(v, torch.Tensor) else v for i, v in enumerate(first)
        )
    y = torch.cat([p[1] for p in parts])
    return x, y


def _split(batch: Batch, k: int) -> tuple[Batch, Batch]:
    x, y = batch
    return (tree_map(lambda t: t[:k], x), y[:k]), (tree_map(lambda t: t[k:], x), y[k:])


def rechunk(batches: Iterable[Batch], batch_size: int) -> Iterator[Batch]:
    """Re-chunk a stream of batches to exactly ``batch_size`` samples (last may be smaller)."""
    buffer: list[Batch] = []
    held = 0
    for b in batches:
        while True:
            n = batch_len(b)
            if held + n < batch_size:
                if n:
                    buffer.append(b)
                    held += n
                break
            head, b = _split(b, batch_size - held)
            buffer.append(head)
            yield _cat(buffer)
            buffer, held = [], 0
    if held:
        yield _cat(buffer)


def iter_batches(data: Any, batch_size: int | None = None, device: torch.device | str | None = None) -> Iterator[Batch]:
    """Yield ``(x, y)`` chunks of at most ``batch_size`` samples, moved to ``device``."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise DataError(f"batch_size: expected a positive int or None, got {batch_size!r}")
    stream: Iterable[Batch] = _raw_batches(data, batch_size)
    if batch_size is not None:
        stream = rechunk(stream, batch_size)
    for x, y in stream:
        if device is not None:
            x = tree_map(lambda t: t.to(device, non_blocking=True), x)
            y = y.to(device, non_blocking=True)
        yield x, y


def count_samples(data: Any) -> int | None:
    """Number of samples when it is known without iterating, else ``None``."""
    if isinstance(data, DataLoader):
        try:
            return len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        return int(data[1].shape[0])
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return len(data)  # type: ignore[arg-type]
    return None


def model_arguments(x: Inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for calling a model on ``x``: a tensor, a positional tuple or a keyword dict."""
    if isinstance(x, Mapping):
        return (), dict(x)
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (x,), {}


def call_model(model: torch.nn.Module, x: Inputs) -> Any:
    """Call ``model`` with ``x`` as a tensor, positional tuple, or keyword dict."""
    args, kwargs = model_arguments(x)
    return model(*args, **kwargs)
