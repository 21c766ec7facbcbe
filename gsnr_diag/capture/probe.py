"""The once-per-run layout probe: which hooked modules do not hold sample i in row i of their input alone,
and whether the model mixes samples at all (then per-sample gradients are undefined)."""

from __future__ import annotations

import torch

from ..data import Inputs, call_model, tensor_leaves, tree_map
from ..errors import ModelError
from .fallback import describe
from .losses import check_batch_mean
from .state import ModelState


class LayoutProbe:
    """Mixin of :class:`~gsnr_diag.capture.capture.GradientCapture` (uses its ``_modules``, ``params``, ``paths``)."""

    # --- layout probe ---------------------------------------------------------------------
    PROBE_SAMPLES = 16

    def _probe_layout(self, x: Inputs, y: torch.Tensor) -> None:
        """Once per run: find hooked modules whose input does not hold sample i in row i alone.

        Rules and samplers assume a module's input is ``[B, ...]`` with sample i in row i and no
        mixing (a sequence layer fed ``[T, B, E]`` breaks this, silently so when T = B). Two
        forward passes on a few samples, the second with sample 0 replaced by another sample:
        if any other row of a module's input changes, that module moves to the fallback.
        """
        n = min(int(y.shape[0]), self.PROBE_SAMPLES)
        if n < 2:
            return  # nothing to compare: try again on the next chunk
        first = tree_map(lambda t: t[:n], x)
        leaves = tensor_leaves(first)
        other = next((j for j in range(1, n) if any(not torch.equal(t[j], t[0]) for t in leaves)), None)
        if other is None:  # all probe samples identical: try again on the next chunk
            return
        self._probed = True

        def swap(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            t[0] = t[other]
            return t

        # A forward may update its buffers (spectral norm's power iteration in train mode, counters): both
        # passes start from the same buffers, so only the swapped sample can change the outputs. (Parameters a
        # forward changes in place, Embedding(max_norm=...), are renormalized the same way in both passes.)
        state = ModelState(self.model, parameter_values=False)
        seen = [self._probe_forward(first)]
        state.restore()
        seen.append(self._probe_forward(tree_map(swap, first)))
        state.restore()
        del state
        if seen[0] is None or seen[1] is None:
            return  # the forward fails: the measurement itself reports it
        (seen[0], out_a), (seen[1], out_b) = seen
        _check_output_mixing(out_a, out_b, n)
        check = getattr(self.loss_fn, "check_batch", None)  # a LossPlan checks its own decomposition
        check(out_a, y[:n]) if check is not None else check_batch_mean(self.loss_fn, out_a, y[:n])
        for name, info in self._modules.items():
            a_list, b_list = seen[0].get(name, []), seen[1].get(name, [])
            if len(a_list) != len(b_list):
                info.problem = "it runs a different number of times for different inputs"
            for a, b in zip(a_list, b_list):
                if a is None or b is None:
                    continue
                if a.ndim and a.shape[0] == 1 and n > 1 and a.shape == b.shape:
                    info.broadcast = True  # a batch of one broadcast over the samples: checked by the tracker
                    continue
                if a.ndim == 0 or a.shape[0] != n or a.shape != b.shape:
                    info.problem = "its input does not have the samples in dimension 0"
                    break
                if _rows_differ(a, b):
                    info.problem = "its input mixes samples or does not hold them in dimension 0"
                    break
            if info.problem:
                self._fallback.update(info.params)
                self.paths[name] = self._fallback_method
            info.problem = None

    def _probe_forward(self, x: Inputs) -> tuple[dict[str, list], object] | None:
        devices = [d.index for d in {p.device for p in self.params.values()} if d.type == "cuda"]
        for info in self._modules.values():
            info.probe = []
        self._probing = True
        try:
            with torch.random.fork_rng(devices=devices):  # the same dropout masks in both passes
                torch.manual_seed(0)
                output = call_model(self.model, x)
        except Exception:
            return None
        finally:
            self._probing = False
        out = {name: info.probe for name, info in self._modules.items()}
        for info in self._modules.values():
            info.probe = []
        return out, tree_map(lambda t: t.detach(), output)


def _rows_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether rows 1: of ``a`` and ``b`` differ beyond round-off (relative to the scale of ``a``)."""
    if a.is_floating_point() or a.is_complex():
        finite = a[torch.isfinite(a)]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        return not torch.allclose(a[1:], b[1:], rtol=1e-5, atol=1e-6 * scale + 1e-30, equal_nan=True)
    return not torch.equal(a[1:], b[1:])


def _check_output_mixing(out_a: object, out_b: object, n: int) -> None:
    """Raise ModelError if replacing sample 0 changed another sample's output: the forward mixes samples.

    Per-sample gradients (eq. 1) are gradients of one sample's own loss; when a sample's output depends on
    other samples of the batch (``h - h.mean(0)``, batch statistics) they are not defined, and measuring a
    batch of one instead would silently measure a different model. Only outputs with the samples in
    dimension 0 can be compared.
    """
    for a, b in zip(tensor_leaves(out_a), tensor_leaves(out_b)):
        if a.ndim == 0 or a.shape[0] != n or a.shape != b.shape or not _rows_differ(a, b):
            continue
        diff = (a[1:] - b[1:]).abs().reshape(n - 1, -1).nan_to_num(nan=float("inf")).amax(1)
        rows = [int(i) + 1 for i in (diff > 0).nonzero().flatten()[:5]]
        raise ModelError(
            f"model: its forward mixes samples: replacing sample 0 of a probe batch of {n} changed the output "
            f"{describe(a)} of other samples too (samples {rows}, change up to {float(diff.max()):.3g}). "
            "Per-sample gradients (eq. 1) need each sample's output to depend on that sample alone; an "
            "operation across the batch dimension (e.g. h - h.mean(0), batch statistics) makes them undefined. "
            "Remove it from the forward, or for BatchNorm measure with mode='eval' (running statistics)"
        )
