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
   the fallback for the rest of the run and the chunk is redone. A module whose rule forms the
   per-sample gradients itself (a convolution, a Linear over a sequence) is checked on the first
   chunk of a call; on later chunks autograd is asked for its output's gradient instead of its
   weights', which saves the backward's weight-gradient product (graph uses are checked on every chunk).
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

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core.moments import ChunkMoments, Moments
from ..data import Inputs, call_model, tree_map
from ..errors import LossError, ModelError, SlowPathWarning
from .bare import BroadcastParams
from .blocks import sample_blocks, samples_moments
from .check import inconsistent
from .fallback import describe, parameter_uses, per_sample_functorch, per_sample_loop, vmap_failure
from .hooks import _ModuleInfo, make_hook, release_outputs, resolve_broadcast_calls
from .nonfinite import NonFiniteSamples
from .plan import PassPlan
from .probe import LayoutProbe
from .registry import DEFAULT_MAX_MEMORY_MB, OUTPUT_BATCHED, RuleContext, find_grad_sampler, find_moment_rule
from .tied import accumulate, densify

PATH_RULE = "moment-rule"
PATH_SAMPLER = "grad-sampler"
PATH_FUNCTORCH = "functorch"
PATH_LOOP = "loop"

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


class GradientCapture(LayoutProbe, BroadcastParams, NonFiniteSamples):
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
        self._bare: dict[str, str] = {}  # parameter of a module without a rule → that module (bare.py)
        self.paths: dict[str, str] = {}
        self.fallback_reasons: dict[str, str] = {}  # module → why it is not on the hook path
        claimed: set[str] = set()  # submodules whose parameters a parent layer's rule measures (out_proj)
        for mname, module in model.named_modules(remove_duplicate=False):
            if mname in claimed:
                continue
            whole = getattr(find_moment_rule(module), "owns_children", False)
            if whole:
                claimed.update(f"{mname}.{c}" if mname else c for c, _ in module.named_modules() if c)
            direct = [p for _, p in module.named_parameters(recurse=whole) if p.requires_grad]
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
                self._bare.update({k: mname for k in names if k not in self._bare})
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                self._fallback.update(names)
                continue
            rule = find_moment_rule(module)
            self._modules[mname] = _ModuleInfo(
                mname,
                module,
                names,
                first_output=getattr(rule, "first_output", False),
                to_batch_first=getattr(rule, "to_batch_first", None),
                inner=getattr(rule, "inner", None),
            )
        self._fallback_method = PATH_FUNCTORCH
        self._plan = PassPlan(next(iter(self.params.values())).device)
        self._handles: list = []
        self._enabled = False
        self._probing = False
        self._probed = self._bprobed = False
        self._batch, self._tracker, self._bare_sources, self._probe_sources = 0, None, {}, {}
        self._scratch: dict = {}  # work buffers the rules keep across chunks (freed on exit)
        # Modules whose rule forms the per-sample gradients itself (a convolution, a Linear over a sequence)
        # and whose hook path passed the consistency check on an earlier chunk: their batch weight gradient
        # (the backward's weight-gradient product, which the rule would only compare against) is not asked for.
        self._skip_batch_grad: set[str] = set()
        # of the last chunk's rule modules, those that did not use the batch gradient
        self._self_checked: set[str] = set()

    # --- hooks -------------------------------------------------------------------------
    def __enter__(self) -> GradientCapture:
        for info in self._modules.values():
            self._handles.append(info.module.register_forward_hook(make_hook(self, info), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._enabled = False
        self._scratch.clear()
        release_outputs(self._modules.values())
        for info in self._modules.values():
            info.calls.clear()

    # --- one chunk -----------------------------------------------------------------------
    def _hooked_names(self) -> list[str]:
        return [k for k in self.params if k not in self._fallback]

    def measure_chunk(self, x: Inputs, y: torch.Tensor, moments: Moments) -> None:
        """Add the per-sample gradient moments of chunk ``(x, y)`` to ``moments``."""
        batch = int(y.shape[0])
        if not self._probed:
            self._probe_layout(x, y)
        if not self._bprobed:
            self._probe_broadcast(x, y)
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
        fallback = [k for k in self.params if k in self._fallback]
        # The whole-model vmap must run: measure every parameter in it (plan.py) unless the split is faster.
        timed = 0 < len(fallback) < len(self.params) and self._fallback_method == PATH_FUNCTORCH
        one = timed and self._plan.one_pass()
        started = self._plan.start()
        hooked = [] if one else self._hooked_names()
        result: dict[str, ChunkMoments] = {}
        if hooked:
            for info in self._modules.values():
                info.calls.clear()
                info.problem = None
            self._enabled, self._batch = True, batch
            self._tracker = tracker = self._start_tracker(batch)
            try:
                if tracker is None:
                    loss = self._forward_loss(x, y)
                else:
                    with tracker:
                        loss = self._forward_loss(x, y)
            finally:
                self._enabled, self._tracker = False, None
            unasked = {k for m in self._skip_batch_grad for k in self._modules[m].params}
            asked = [k for k in hooked if k not in unasked]
            outputs = [c.output for m in self._skip_batch_grad for c in self._modules[m].calls if c.output is not None]
            release_outputs(self._modules.values())
            uses = parameter_uses(loss)
            grads = torch.autograd.grad(loss, [self.params[k] for k in asked] + outputs, allow_unused=True)
            batch_grad = {k: g.to_dense() if g is not None and g.is_sparse else g for k, g in zip(asked, grads)}
            del loss, grads, outputs
            resolve_broadcast_calls(self._modules.values())
            result, moved = self._bare_moments(batch)
            result, moved = self._from_hooks(batch, batch_grad, uses, result, moved, unasked)
            for info in self._modules.values():
                info.calls.clear()
            if moved:
                self._fallback.update(moved)
                self._skip_batch_grad.clear()  # the next attempt checks every module again
                return None
            self._skip_batch_grad |= self._self_checked
        if one:
            fallback = list(self.params)
        if fallback:
            # Per-sample gradients of the fallback parameters, block by block over the samples.
            per_sample_bytes = 3 * 8 * sum(self.params[k].numel() for k in fallback)
            acc: dict[str, ChunkMoments] = {}
            for s, e in sample_blocks(batch, per_sample_bytes, self.budget):
                xs, ys = (x, y) if e - s == batch else (tree_map(lambda t: t[s:e], x), y[s:e])
                for k, g in self._per_sample_fallback(xs, ys, fallback).items():
                    c = samples_moments(g, self.signs)
                    acc[k] = acc[k].combine(c) if k in acc else c
            result.update(acc)
        if timed and self._fallback_method == PATH_FUNCTORCH:
            self._plan.record(one, started, batch)
        return result

    def _from_hooks(
        self,
        batch: int,
        batch_grad: dict,
        uses: dict[int, int],
        result: dict,
        moved: set[str],
        unasked: set[str] = frozenset(),
    ):
        sampler_jobs: list = []
        trusted: set[str] = set()  # mean taken from the batch gradient by a rule (checked by graph uses instead)
        self._self_checked = set()
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
                self.fallback_reasons[info.name] = problem
                continue
            module = info.module
            shared = any(len(self._owners[id(self.params[k])]) > 1 for k in names)
            rule = find_moment_rule(module)
            done = False
            if len(calls) == 1 and not shared and rule is not None:
                # A broadcast call's output has other uses than the one caught: no mean from the batch gradient.
                given = {} if calls[0].source is not None else batch_grad
                grads = _Grads({self.params[k]: given[k] for k in names if given.get(k) is not None})
                c = calls[0]
                ctx = RuleContext(c.activations, c.backprops * batch, self.signs, self.budget, grads, self._scratch)
                ctx.kwargs, ctx.inner = c.kwargs, c.inner
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
                    if calls[0].source is None and not any(k in trusted or k in moved for k in names):
                        self._self_checked.add(info.name)
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
        layers = [info.params for info in self._modules.values()]
        layers += [[k for k, m in self._bare.items() if m == owner] for owner in set(self._bare.values())]
        # (parameters in ``unasked`` passed it on an earlier chunk; their batch gradient was not formed)
        moved |= inconsistent(result, batch_grad, batch, moved | trusted | unasked, layers)
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
                    bp = bp * batch
                    inputs = [t for t in [*acts, bp] if isinstance(t, torch.Tensor)]
                    borrowed = {t.untyped_storage().data_ptr() for t in inputs}
                    for p, gs in sampler(module, acts, bp).items():
                        k = self._name_of.get(id(p))
                        if k is None or k in self._fallback:
                            continue
                        accumulate(block, k, gs, borrowed)
            for k, g in block.items():
                cm = samples_moments(densify(g), self.signs)
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
            except Exception as exc:
                self._fallback_method = PATH_LOOP
                warnings.warn(
                    f"gsnr-diag: torch.func.vmap cannot run this model: {vmap_failure(exc)} stopped it; the "
                    "per-sample gradients it would give come from a batch-of-one loop instead (exact, slow)",
                    SlowPathWarning,
                    stacklevel=2,
                )
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


class _Grads(dict):
    """The batch gradient Σ_i g_i / B, keyed by parameter; records which ones a rule used."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used: set[int] = set()

    def get(self, key, default=None):
        if key in self:
            self.used.add(id(key))
        return super().get(key, default)
