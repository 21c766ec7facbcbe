"""Parameters used outside any layer with a rule, measured where they are broadcast over the batch.

Mixin of :class:`~gsnr_diag.capture.capture.GradientCapture`: a bare ``nn.Parameter`` (a CLS token,
a learned position embedding added to ``[B, T, D]``, a layer scale multiplying it) and the output
of a layer run on a batch of one get their per-sample gradients from the
:class:`~gsnr_diag.capture.broadcast.BroadcastTracker`. Once per run, a probe of two forward
passes on a few samples (the second with sample 0 replaced) checks that every tensor they are
broadcast against holds sample i in row i alone; anything else goes to the fallback.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..core.moments import ChunkMoments
from ..data import Inputs, call_model, tensor_leaves, tree_map
from .blocks import samples_moments
from .broadcast import BroadcastTracker, LinearUse, Source, mixed_layout
from .linear import linear_moments
from .registry import RuleContext


class BroadcastParams:
    """Uses the capture's ``params``, ``_bare`` (name → owner module), ``_fallback``, ``_modules``, ``paths``."""

    PROBE_SAMPLES = 16
    FUNCTIONAL_LINEAR = True  # measure F.linear(x, self.weight, self.bias) of bare parameters by the Linear rule

    def _live_bare(self) -> list[str]:
        return [k for k in self._bare if k not in self._fallback]

    def _needs_tracker(self) -> bool:
        return bool(self._live_bare()) or any(info.broadcast for info in self._modules.values())

    def _probe_source(self, name: str, shape: tuple) -> Source:
        src = Source(shape, drop_leading=True)
        self._probe_sources.setdefault(name, []).append(src)
        return src

    def _to_fallback(self, names, owner: str, why: str) -> None:
        self._fallback.update(names)
        self.paths[owner] = self._fallback_method
        self.fallback_reasons[owner] = why

    def _probe_broadcast(self, x: Inputs, y: torch.Tensor) -> None:
        """Once per run: the tensors that watched tensors are broadcast against hold sample i in row i alone."""
        n = min(int(y.shape[0]), self.PROBE_SAMPLES)
        if n < 2 or not self._needs_tracker():
            self._bprobed = n >= 2 or not self._needs_tracker()
            return
        first = tree_map(lambda t: t[:n], x)
        leaves = tensor_leaves(first)
        other = next((j for j in range(1, n) if any(not torch.equal(t[j], t[0]) for t in leaves)), None)
        if other is None:
            return

        def swap(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            t[0] = t[other]
            return t

        devices = [d.index for d in {p.device for p in self.params.values()} if d.type == "cuda"]
        passes = []
        for xs in (first, tree_map(swap, first)):
            tracker = BroadcastTracker(n, record_others=True, functional_linear=self.FUNCTIONAL_LINEAR)
            bare = {k: Source(tuple(self.params[k].shape)) for k in self._live_bare()}
            for k, src in bare.items():
                tracker.watch(self.params[k], src)
            self._probe_sources, self._tracker, self._batch = {}, tracker, n
            try:
                with torch.random.fork_rng(devices=devices), tracker:
                    torch.manual_seed(0)
                    call_model(self.model, xs)
            except Exception:
                return  # the forward fails: the measurement itself reports it
            finally:
                self._tracker = None
            found = {("param", k): [s] for k, s in bare.items()}
            found.update({("module", m): s for m, s in self._probe_sources.items()})
            passes.append(found)
        self._bprobed = True
        for key in set(passes[0]) | set(passes[1]):
            a, b = passes[0].get(key, []), passes[1].get(key, [])
            why = next((s.problem for s in a + b if s.problem), None)
            if why is None:
                why = mixed_layout([o for s in a for o in s.others], [o for s in b for o in s.others], n)
            if why is None:
                continue
            kind, name = key
            if kind == "param":
                self._to_fallback([name], self._bare[name], why)
            elif name in self._modules:
                self._to_fallback(self._modules[name].params, name, why)

    def _start_tracker(self, batch: int) -> BroadcastTracker | None:
        """The tracker of one hooked forward pass, watching every bare parameter still measured here."""
        self._bare_sources = {}
        if not self._needs_tracker():
            return None
        tracker = BroadcastTracker(batch, functional_linear=self.FUNCTIONAL_LINEAR)
        for k in self._live_bare():
            src = self._bare_sources[k] = Source(tuple(self.params[k].shape))
            tracker.watch(self.params[k], src)
        return tracker

    def _bare_moments(self, batch: int) -> tuple[dict[str, ChunkMoments], set[str]]:
        """Moments of the bare parameters from their summed per-sample gradients; those with a problem move."""
        out: dict[str, ChunkMoments] = {}
        moved: set[str] = set()
        done: set[int] = set()  # F.linear calls measured (a weight and its bias share one)
        for k, src in self._bare_sources.items():
            if src.problem:
                moved.add(k)
                self.fallback_reasons[self._bare[k]] = src.problem
                continue
            if src.linear:
                use = src.linear[0]
                if len(src.linear) != 1 or src.uses != 1 or src.parts or use.backprops is None:
                    moved.add(k)
                    self.fallback_reasons[self._bare[k]] = "it is used by F.linear and elsewhere"
                    continue
                if id(use) not in done:
                    done.add(id(use))
                    out.update(self._functional_linear(use, batch))
                self.paths[self._bare[k]] = "moment-rule"
                continue
            g = src.total()  # backprops of the batch-mean loss: × B gives each sample's own (as for the hooks)
            p = self.params[k]
            g = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device) if g is None else g * batch
            out[k] = samples_moments(g, self.signs)
            self.paths[self._bare[k]] = "grad-sampler"
        self._bare_sources = {}
        return out, moved

    def _functional_linear(self, use: LinearUse, batch: int) -> dict[str, ChunkMoments]:
        """Moments of the watched weight and bias of one ``F.linear`` call, by the nn.Linear moment rule."""
        watched = {id(self.params[k]): k for k in self._bare_sources}
        layer = SimpleNamespace(
            weight=use.weight if id(use.weight) in watched else use.weight.detach(),
            bias=use.bias if use.bias is None or id(use.bias) in watched else use.bias.detach(),
        )
        ctx = RuleContext([use.x], use.backprops * batch, self.signs, self.budget, None, self._scratch)
        got = linear_moments(layer, ctx) or {}
        return {watched[id(p)]: c for p, c in got.items() if id(p) in watched}
