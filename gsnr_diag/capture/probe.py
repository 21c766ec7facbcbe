"""The once-per-run layout probe: which hooked modules do not hold sample i in row i of their input alone."""

from __future__ import annotations

import torch

from ..data import Inputs, call_model, tensor_leaves, tree_map


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
        if n < 2 or not self._modules:
            self._probed = n >= 2 or not self._modules
            return
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

        seen = [self._probe_forward(first), self._probe_forward(tree_map(swap, first))]
        if seen[0] is None or seen[1] is None:
            return  # the forward fails: the measurement itself reports it
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
                if a.is_floating_point():
                    finite = a[torch.isfinite(a)]
                    scale = float(finite.abs().max()) if finite.numel() else 0.0
                    mixed = not torch.allclose(a[1:], b[1:], rtol=1e-5, atol=1e-6 * scale + 1e-30, equal_nan=True)
                else:
                    mixed = not torch.equal(a[1:], b[1:])
                if mixed:
                    info.problem = "its input mixes samples or does not hold them in dimension 0"
                    break
            if info.problem:
                self._fallback.update(info.params)
                self.paths[name] = self._fallback_method
            info.problem = None

    def _probe_forward(self, x: Inputs) -> dict[str, list] | None:
        devices = [d.index for d in {p.device for p in self.params.values()} if d.type == "cuda"]
        for info in self._modules.values():
            info.probe = []
        self._probing = True
        try:
            with torch.random.fork_rng(devices=devices):  # the same dropout masks in both passes
                torch.manual_seed(0)
                call_model(self.model, x)
        except Exception:
            return None
        finally:
            self._probing = False
        out = {name: info.probe for name, info in self._modules.items()}
        for info in self._modules.values():
            info.probe = []
        return out
