"""``gsnr-diag stats``: the per-layer GSNR table of a model file's model, at initialization or saved weights."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import GsnrDiagError
from .common import EXIT_CODES_HELP, MODEL_FILE_HELP, InputError, check_device, library_failure, user_code_failure

__all__ = ["stats"]


@click.command(epilog=MODEL_FILE_HELP + "\n\n" + EXIT_CODES_HELP)
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, exists=False, path_type=Path),
    default=None,
    help="A state_dict checkpoint (torch.save) to measure at, loaded with weights_only=True "
    "[measure at initialization].",
)
@click.option("--device", default="cpu", show_default=True, help="Torch device to measure on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the initialization.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Samples per gradient chunk (the memory bound).",
)
@click.option("--test", "use_test", is_flag=True, help="Measure on the test set instead of the training set.")
def stats(model_file: Path, weights: Path | None, device: str, seed: int, batch_size: int, use_test: bool) -> None:
    """Print the per-layer GSNR table of MODEL_FILE's model at initialization or at saved weights."""
    from .modelfile import ModelFileError, UserCodeError, load_model_file

    try:
        import torch
        from torch import nn

        from ..dynamics.monitor import infer_task
        from ..measure import gradient_stats

        mf = load_model_file(model_file)
        check_device(device)
        torch.manual_seed(seed)
        model = mf.build()
        if weights is not None:
            _load_weights(model, weights)
        model = model.to(device)
        train_data, test_data = mf.data()
        data = train_data
        if use_test:
            if test_data is None:
                raise InputError(f"--test: load_data() in {model_file} returns no test set")
            data = test_data
        loss_fn = mf.loss_fn
        if loss_fn is None:
            task = mf.task or infer_task(None, data)
            loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()
        result = gradient_stats(model, data, loss_fn, batch_size=batch_size)
    except UserCodeError as exc:
        user_code_failure(exc)
        return
    except (ModelFileError, GsnrDiagError) as exc:
        raise library_failure(exc, model_file) from exc
    where = f"weights {weights}" if weights is not None else f"initialization (seed {seed})"
    click.echo(f"{model_file} at {where}, on the {'test' if use_test else 'training'} set:\n")
    click.echo(result.summary())


def _load_weights(model, path: Path) -> None:
    import torch

    if not path.exists():
        raise InputError(f"--weights {path}: no such file")
    if path.is_dir():
        raise InputError(f"--weights {path}: is a directory; pass a checkpoint file")
    hint = "save one with torch.save(model.state_dict(), path)"
    if path.stat().st_size == 0:
        raise InputError(f"--weights {path}: the file is empty; {hint}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a file that is not a checkpoint
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"--weights {path}: not a PyTorch checkpoint loadable with weights_only=True "
            f"({type(exc).__name__}: {first[:200]}); {hint}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"--weights {path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise InputError(
            f"--weights {path}: a state_dict maps parameter names (strings) to tensors, but this dict has "
            f"key(s) {bad_keys[:5]!r}; {hint}"
        )
    bad_values = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad_values:
        raise InputError(
            f"--weights {path}: {bad_values[:5]} hold {type(state[bad_values[0]]).__name__}, not tensors; {hint}"
        )
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise InputError(f"--weights {path}: does not match build_model()'s model:\n{exc}") from None
