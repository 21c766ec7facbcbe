"""Per-sample gradient moments of one chunk, with the model left untouched afterwards.

How a chunk is measured:

1. One ordinary forward pass with forward hooks on every module that owns trainable
   parameters and has a moment rule or a grad sampler (ours in the family modules of this package, else
   Opacus' ``GradSampleModule.GRAD_SAMPLERS``). The hook keeps the module's inputs and puts a
   tensor hook on its output to catch the backprops. One ``torch.autograd.grad`` call (which
   never touches ``.grad``) gives the backprops and the batch-mean gradient.
2. Per module: a moment rule (Σg, Σg², sign counts without per-sample gradients) when the
   module ran once and its parameters are not shared; otherwise the sampler's per-sample
   gradients, summed over calls and over the modules that share a parameter (tied weights).
3. Every parameter's Σ_i g_i is checked against the batch gradient; a parameter whose hook
   path does not add up (used outside its module, batch not in dimension 0, ...) moves to
   the fallback for the rest of the run and the chunk is redone.
4. Fallback for everything else (custom modules with bare ``nn.Parameter``s,
   ``nn.MultiheadAttention``, ...): per-sample gradients of the whole model with
   ``torch.func.vmap(grad(...))`` over the samples, and a batch-of-one loop if vmap
   cannot run the model.

Why not ``opacus.GradSampleModule`` itself: its activation hook returns early when a module
is in eval mode (gsnr-diag measures in eval mode by default), its functorch fallback replays
only a layer's first positional input and refuses layers with buffers, and it writes
``p.grad_sample`` onto the user's parameters. We reuse its per-layer grad samplers (the part
worth reusing) behind our own hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.moments import ChunkMoments, Moments
from ..data import Inputs, call_model, tree_map
from ..errors import LossError, ModelError, NonFiniteGradientError
from .blocks import sample_blocks
from .fallback import describe, parameter_uses, per_sample_functorch, per_sample_loop
from .probe import LayoutProbe
from .registry import DEFAULT_MAX_MEMORY_MB, OUTPUT_BATCHED, RuleContext, find_grad_sampler, find_moment_rule

PATH_RULE = "moment-rule"
PATH_SAMPLER = "grad-sampler"
PATH_FUNCTORCH = "functorch"
PATH_LOOP = "loop"

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass
class _Call:
    activations: list
    backprops: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)


@dataclass
class _ModuleInfo:
    name: str
    module: nn.Module
    params: list[str]  # trainable parameter names owned directly by this module
    calls: list[_Call] = field(default_factory=list)
    problem: str | None = None
    probe: list = field(default_factory=list)  # first inputs seen during the layout probe


class GradientCapture(LayoutProbe):
    """Installs hooks on ``model`` for the duration of a ``with`` block and measures chunks.

    ``measure_chunk(x, y, moments)`` adds one chunk's per-parameter moments to ``moments``.
    All hooks are removed on exit; ``.grad`` and the parameters are never written.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        signs: bool = True,
        skip_nonfinite: bool = False,
        max_memory_mb: float | None = None,
    ):
        self.model = model
        # Bound on the bytes of one materialized block (per-sample gradients, unfolded inputs).
        self.budget = float(max_memory_mb if max_memory_mb is not None else DEFAULT_MAX_MEMORY_MB) * 2**20
        self.loss_fn = loss_fn
        self.signs = signs
        self.skip_nonfinite = skip_nonfinite
        self.skipped = 0
        # named_parameters() drops duplicates: a tied weight appears once, under its first name.
        self.params: dict[str, nn.Parameter] = {k: p for k, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ModelError(
                "model: it has no trainable parameters (every parameter has requires_grad=False); "
                "GSNR is measured over trainable parameters only"
            )
        self._name_of = {id(p): k for k, p in self.params.items()}
        self._owners: dict[int, list[str]] = {}
        self._modules: dict[str, _ModuleInfo] = {}
        self._fallback: set[str] = set()
        self.paths: dict[str, str] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            direct = [p for _, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not direct:
                continue
            for p in direct:
                owners = self._owners.setdefault(id(p), [])
                if mname not in owners:
                    owners.append(mname)
            names = [self._name_of[id(p)] for p in direct]
            if mname in self._modules:  # the same module reachable under two names
                continue
            if find_moment_rule(module) is None and find_grad_sampler(module) is None:
                self._fallback.update(names)
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                self._fallback.update(names)
                continue
            self._modules[mname] = _ModuleInfo(mname, module, names)
        self._fallback_method = PATH_FUNCTORCH
        self._handles: list = []
        self._enabled = False
        self._probing = False
        self._probed = False
        self._scratch: dict = {}  # work buffers the rules keep across chunks (freed on exit)

    # --- hooks -------------------------------------------------------------------------
    def __enter__(self) -> GradientCapture:
        for info in self._modules.values():
            self._handles.append(info.module.register_forward_hook(self._make_hook(info), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._enabled = False
        self._scratch.clear()
        for info in self._modules.values():
            info.calls.clear()

    def _make_hook(self, info: _ModuleInfo):
        def hook(module, args, kwargs, output):
            if self._probing:  # the rows that hold the samples: the input's, or the output's
                a0 = output if type(module) in OUTPUT_BATCHED else (args[0] if args else None)
                info.probe.append(a0.detach().clone() if isinstance(a0, torch.Tensor) else None)
                return
            if not self._enabled:
                return
            if not isinstance(output, torch.Tensor):
                info.problem = f"returns a {type(output).__name__}, not a tensor"
                return
            if not output.requires_grad:
                return
            det = lambda a: a.detach() if isinstance(a, torch.Tensor) else a
            call = _Call([det(a) for a in args], kwargs={k: det(v) for k, v in kwargs.items()})
            info.calls.append(call)

            def catch(grad, call=call):
                call.backprops = grad.detach()

            output.register_hook(catch)

        return hook

    # --- one chunk -----------------------------------------------------------------------
    def _hooked_names(self) -> list[str]:
        return [k for k in self.params if k not in self._fallback]

    def measure_chunk(self, x: Inputs, y: torch.Tensor, moments: Moments) -> None:
        """Add the per-sample gradient moments of chunk ``(x, y)`` to ``moments``."""
        batch = int(y.shape[0])
        if not self._probed:
            self._probe_layout(x, y)
        for _attempt in range(3):
            result = self._try_chunk(x, y, batch)
            if result is not None:
                break
        else:  # pragma: no cover - the plan can only shrink, so this cannot loop forever
            raise RuntimeError("gsnr-diag could not settle a capture plan")
        # A NaN/inf anywhere makes the sum non-finite (M2 ≥ 0, so only an overflow of finite values
        # could raise a false alarm, which _handle_nonfinite then resolves exactly).
        bad = [k for k, c in result.items() if not bool(torch.isfinite(c.mean.sum() + c.m2.sum()))]
        if bad:
            self._handle_nonfinite(x, y, batch, moments)
            return
        for k, c in result.items():
            moments.add(k, c, consume=True)  # copies on a first chunk: rules may return work buffers

    def _forward_loss(self, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        try:
            output = call_model(self.model, x)
        except Exception as exc:
            raise ModelError(
                f"model: the forward pass failed on a chunk of {int(y.shape[0])} samples "
                f"(inputs {describe(x)}): {type(exc).__name__}: {exc}"
            ) from exc
        try:
            loss = self.loss_fn(output, y)
        except Exception as exc:
            raise LossError(
                f"loss_fn: raised {type(exc).__name__} on model output {describe(output)} and target "
                f"{describe(y)}: {exc}. loss_fn(output, target) must return the batch mean of "
                "per-sample losses, e.g. nn.CrossEntropyLoss() or F.mse_loss"
            ) from exc
        if not isinstance(loss, torch.Tensor):
            raise LossError(
                f"loss_fn: returned a {type(loss).__name__}; expected a scalar tensor (the batch mean loss)"
            )
        if loss.numel() != 1:
            raise LossError(
                f"loss_fn: returned a tensor of shape {tuple(loss.shape)}; expected a scalar, the batch mean "
                "of per-sample losses (use reduction='mean', PyTorch's default)"
            )
        if not loss.requires_grad:
            raise LossError(
                "loss_fn: the loss does not depend on any trainable parameter (it has no grad_fn); "
                "is the model output detached, or computed under torch.no_grad()?"
            )
        return loss.reshape(())

    def _try_chunk(self, x: Inputs, y: torch.Tensor, batch: int) -> dict[str, ChunkMoments] | None:
        hooked = self._hooked_names()
        result: dict[str, ChunkMoments] = {}
        if hooked:
            for info in self._modules.values():
                info.calls.clear()
                info.problem = None
            self._enabled = True
            try:
                loss = self._forward_loss(x, y)
            finally:
                self._enabled = False
            plist = [self.params[k] for k in hooked]
            uses = parameter_uses(loss)
            grads = torch.autograd.grad(loss, plist, allow_unused=True)
            batch_grad = {k: g.to_dense() if g is not None and g.is_sparse else g for k, g in zip(hooked, grads)}
            del loss
            result, moved = self._from_hooks(batch, batch_grad, uses)
            for info in self._modules.values():
                info.calls.clear()
            if moved:
                self._fallback.update(moved)
                return None
        fallback = [k for k in self.params if k in self._fallback]
        if fallback:
            # Per-sample gradients of the fallback parameters, block by block over the samples.
            per_sample_bytes = 3 * 8 * sum(self.params[k].numel() for k in fallback)
            acc: dict[str, ChunkMoments] = {}
            for s, e in sample_blocks(batch, per_sample_bytes, self.budget):
                xs, ys = (x, y) if e - s == batch else (tree_map(lambda t: t[s:e], x), y[s:e])
                for k, g in self._per_sample_fallback(xs, ys, fallback).items():
                    c = ChunkMoments.from_samples(g, self.signs)
                    acc[k] = acc[k].combine(c) if k in acc else c
            result.update(acc)
        return result

    def _from_hooks(self, batch: int, batch_grad: dict[str, torch.Tensor | None], uses: dict[int, int]):
        result: dict[str, ChunkMoments] = {}
        sampler_jobs: list = []
        moved: set[str] = set()
        trusted: set[str] = set()  # mean taken from the batch gradient by a rule (checked by graph uses instead)
        for info in self._modules.values():
            names = [k for k in info.params if k not in self._fallback]
            if not names:
                continue
            calls = [c for c in info.calls if c.backprops is not None]
            problem = info.problem
            for c in calls:
                a0 = c.backprops if type(info.module) in OUTPUT_BATCHED else (c.activations or [None])[0]
                if not isinstance(a0, torch.Tensor) or a0.shape[:1] != (batch,) or c.backprops.shape[:1] != (batch,):
                    problem = "its input or output does not have the samples in dimension 0"
            if problem:
                moved.update(names)
                self.paths[info.name] = self._fallback_method
                continue
            module = info.module
            shared = any(len(self._owners[id(self.params[k])]) > 1 for k in names)
            rule = find_moment_rule(module)
            done = False
            if len(calls) == 1 and not shared and rule is not None:
                grads = _Grads({self.params[k]: batch_grad[k] for k in names if batch_grad.get(k) is not None})
                c0 = calls[0]
                ctx = RuleContext(c0.activations, c0.backprops * batch, self.signs, self.budget, grads, self._scratch)
                ctx.kwargs = c0.kwargs
                out = rule(module, ctx)
                if out is not None:
                    for p, c in out.items():
                        k = self._name_of.get(id(p))
                        if k in names:  # not those already moved to the fallback
                            result[k] = c
                    for k in names:
                        # A rule sees one call of its module; a parameter that autograd reaches by
                        # any other route (used outside the module) cannot take this path.
                        if uses.get(id(self.params[k]), 0) != 1:
                            moved.add(k)
                        elif id(self.params[k]) in grads.used:
                            trusted.add(k)
                    self.paths[info.name] = PATH_RULE
                    done = True
            if not done:
                sampler = find_grad_sampler(module)
                if sampler is None:
                    moved.update(names)
                    self.paths[info.name] = self._fallback_method
                    continue
                sampler_jobs.append((module, sampler, calls, names))
                self.paths[info.name] = PATH_SAMPLER
        if sampler_jobs:
            result.update(self._sampler_moments(batch, sampler_jobs))
        # Parameters owned by hooked modules that never ran (or ran outside the loss): zero gradient.
        for k in self._hooked_names():
            if k not in result and k not in moved:
                zeros = torch.zeros(self.params[k].shape, dtype=torch.float64, device=self.params[k].device)
                result[k] = ChunkMoments(
                    batch,
                    zeros,
                    zeros.clone(),
                    zeros.clone() if self.signs else None,
                    zeros.clone() if self.signs else None,
                )
        # Consistency check: the hook path must add up to the batch gradient.
        for k, c in result.items():
            if k in moved or k in trusted:
                continue
            g = batch_grad.get(k)
            total = c.mean * batch
            ref = torch.zeros_like(total) if g is None else g.to(torch.float64) * batch
            scale = math.sqrt(batch * max(float((c.m2 + c.mean.square() * batch).max()), 0.0)) if total.numel() else 0.0
            scale = max(scale, float(ref.abs().max()) if ref.numel() else 0.0)
            err = float((total - ref).abs().max()) if total.numel() else 0.0
            if not math.isfinite(err):
                continue  # non-finite gradients are reported separately
            floor = 0.0 if c.floor is None or not c.floor.numel() else batch * float(c.floor.max())  # rounding
            if err > 1e-4 * scale + floor + 1e-30:
                moved.add(k)
        for k in moved:
            for info in self._modules.values():
                if k in info.params:
                    self.paths[info.name] = self._fallback_method
        return result, moved

    def _sampler_moments(self, batch: int, jobs: list) -> dict[str, ChunkMoments]:
        """Moments from grad samplers, block by block over the samples (≤ ``self.budget`` bytes).

        Per-sample gradients of a parameter are summed over its module's calls and over the
        modules that share it (tied weights) before they are squared.
        """
        numel = sum(self.params[k].numel() for _, _, _, names in jobs for k in names)
        acc: dict[str, ChunkMoments] = {}
        for s, e in sample_blocks(batch, 3 * 8 * numel, self.budget):
            whole = e - s == batch
            block: dict[str, torch.Tensor] = {}
            for module, sampler, calls, _names in jobs:
                for c in calls:
                    acts = (
                        c.activations
                        if whole
                        else [
                            a[s:e] if isinstance(a, torch.Tensor) and a.ndim and a.shape[0] == batch else a
                            for a in c.activations
                        ]
                    )
                    bp = c.backprops if whole else c.backprops[s:e]
                    for p, gs in sampler(module, acts, bp * batch).items():
                        k = self._name_of.get(id(p))
                        if k is None or k in self._fallback:
                            continue
                        block[k] = block[k] + gs if k in block else gs
            for k, g in block.items():
                cm = ChunkMoments.from_samples(g, self.signs)
                acc[k] = acc[k].combine(cm) if k in acc else cm
            del block
        return acc

    # --- fallback: per-sample gradients of the whole model ------------------------------
    def _per_sample_fallback(self, x: Inputs, y: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        if self._fallback_method == PATH_FUNCTORCH:
            try:
                out = self._per_sample_functorch(x, y, names)
                self._record_fallback_paths(names, PATH_FUNCTORCH)
                return out
            except (LossError, ModelError):
                raise
            except Exception:
                self._fallback_method = PATH_LOOP
        out = self._per_sample_loop(x, y, names)
        self._record_fallback_paths(names, PATH_LOOP)
        return out

    def _record_fallback_paths(self, names: list[str], path: str) -> None:
        ns = set(names)
        for mname, module in self.model.named_modules():
            for _, p in module.named_parameters(recurse=False):
                if self._name_of.get(id(p)) in ns:
                    self.paths[mname] = path

    def _per_sample_functorch(self, x: Inputs, y: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        return per_sample_functorch(self.model, self.loss_fn, x, y, names)

    def _per_sample_loop(self, x: Inputs, y: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        return per_sample_loop(self._forward_loss, [self.params[k] for k in names], names, x, y)

    # --- non-finite gradients ------------------------------------------------------------
    def _handle_nonfinite(self, x: Inputs, y: torch.Tensor, batch: int, moments: Moments) -> None:
        names = list(self.params)
        per_sample = self._per_sample_loop(x, y, names)
        bad_sample = torch.zeros(batch, dtype=torch.bool, device=y.device)
        bad_params = []
        for k, g in per_sample.items():
            nonfinite = ~torch.isfinite(g.reshape(batch, -1)).all(1)
            if bool(nonfinite.any()):
                bad_params.append(k)
                bad_sample |= nonfinite.to(bad_sample.device)
        n_bad = int(bad_sample.sum())
        if n_bad == 0:  # the batch path overflowed but no single sample did; use the loop result
            for k, g in per_sample.items():
                moments.add(k, ChunkMoments.from_samples(g, self.signs))
            return
        if not self.skip_nonfinite:
            shown = ", ".join(bad_params[:8]) + (" ..." if len(bad_params) > 8 else "")
            raise NonFiniteGradientError(
                f"per-sample gradients are NaN/inf for {n_bad} of {batch} samples in a chunk, in parameters: "
                f"{shown}. Check the inputs and the loss (log of 0? division by 0?), or pass "
                "skip_nonfinite=True to skip such samples and count them"
            )
        self.skipped += n_bad
        keep = (~bad_sample).nonzero().flatten()
        if keep.numel():
            for k, g in per_sample.items():
                moments.add(k, ChunkMoments.from_samples(g[keep.to(g.device)], self.signs))


class _Grads(dict):
    """The batch gradient Σ_i g_i / B, keyed by parameter; records which ones a rule used."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used: set[int] = set()

    def get(self, key, default=None):
        if key in self:
            self.used.add(id(key))
        return super().get(key, default)
