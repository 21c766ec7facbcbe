"""Per-sample gradient moments of the user's own training mini-batches, taken during their ``loss.backward()``.

The same moment rules and grad samplers as :class:`~gsnr_diag.capture.GradientCapture`, on the real
training pass: a forward hook on every module that owns trainable parameters keeps its inputs and puts
a tensor hook on its output; when the backward pass reaches that output, the hook turns the backprops
(rescaled by the batch size for a batch-mean loss, so they are those of each sample's own loss, eq. 1)
into the module's Σg, Σg² and sign counts for that mini-batch. The hooks read tensors only: they
return nothing, so autograd, ``.grad`` and the parameters are exactly what they would be without them.

What cannot be measured this way is left out and named in ``unmeasured`` (never guessed): parameters
of modules with neither a moment rule nor a grad sampler (the offline capture's whole-model vmap
fallback would need a second pass), parameters shared by several modules (tied weights), and modules
whose inputs do not carry the samples in dimension 0. A BatchNorm layer in train mode mixes the
samples of a batch, so per-sample gradients are undefined: such a forward raises ``ModelError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.moments import ChunkMoments
from ..errors import ModelError
from .blocks import samples_moments
from .registry import DEFAULT_BUDGET, RuleContext, find_grad_sampler, find_moment_rule

__all__ = ["OnlineCapture", "StepMoments", "LOSS_REDUCTIONS"]

LOSS_REDUCTIONS = ("mean", "sum")


@dataclass
class StepMoments:
    """The per-parameter moments of one training mini-batch of ``batch`` samples."""

    batch: int
    moments: dict[str, ChunkMoments] = field(default_factory=dict)


@dataclass
class _Module:
    name: str
    module: nn.Module
    params: list[str]
    calls: list = field(default_factory=list)  # [activations, backprops | None] per call in this step


class OnlineCapture:
    """Hooks on ``model`` that call ``on_step(StepMoments)`` once per backward pass through it.

    Args:
        model: the model being trained; hooks are added by :meth:`attach` and removed by :meth:`detach`.
        on_step: receives the moments of every completed mini-batch.
        signs: also count per-element gradient signs (same-sign fraction); extra work per step.
        loss_reduction: ``"mean"`` (the loss is the batch mean of per-sample losses, PyTorch's default)
            or ``"sum"``.
    """

    def __init__(
        self,
        model: nn.Module,
        on_step: Callable[[StepMoments], None],
        *,
        signs: bool = False,
        loss_reduction: str = "mean",
    ):
        if not isinstance(model, nn.Module):
            raise ModelError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ModelError(f"loss_reduction: expected 'mean' or 'sum', got {loss_reduction!r}")
        self.model, self.on_step, self.signs, self.loss_reduction = model, on_step, signs, loss_reduction
        self.params: dict[str, nn.Parameter] = {k: p for k, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ModelError("model: it has no trainable parameters (every parameter has requires_grad=False)")
        name_of = {id(p): k for k, p in self.params.items()}
        owners: dict[str, list[str]] = {}
        direct: dict[str, tuple[nn.Module, list[str]]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            names = [name_of[id(p)] for _, p in module.named_parameters(recurse=False) if p.requires_grad]
            for k in names:
                if mname not in owners.setdefault(k, []):
                    owners[k].append(mname)
            if names and mname not in direct and not any(m is module for m, _ in direct.values()):
                direct[mname] = (module, names)
        self.unmeasured: dict[str, str] = {}
        for k, mods in owners.items():
            if len(mods) > 1:
                self.unmeasured[k] = f"shared by the modules {mods} (tied weights)"
        self._modules: list[_Module] = []
        for mname, (module, names) in direct.items():
            if find_moment_rule(module) is None and find_grad_sampler(module) is None:
                for k in names:
                    self.unmeasured.setdefault(k, f"{type(module).__name__} has no moment rule or grad sampler")
                continue
            names = [k for k in names if k not in self.unmeasured]
            if names:
                self._modules.append(_Module(mname, module, names))
        self._batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._handles: list = []
        self._step: StepMoments | None = None
        self._pending = 0  # calls whose backprops have not arrived yet
        self._token = 0  # which forward the recorded calls belong to
        self.dropped = 0  # forwards with gradients whose backward never completed
        self.paths: dict[str, str] = {}

    @property
    def measured(self) -> list[str]:
        """Names of the parameters whose per-sample moments are captured."""
        return [k for m in self._modules for k in m.params if k not in self.unmeasured]

    # --- lifecycle -----------------------------------------------------------------------
    def attach(self) -> OnlineCapture:
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward))
        for info in self._modules:
            self._handles.append(info.module.register_forward_hook(self._make_hook(info)))
        return self

    def detach(self) -> None:
        """Remove every hook (the model is as before attach) and deliver a completed last step."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.flush()
        for info in self._modules:
            info.calls.clear()

    def flush(self) -> None:
        """Deliver the current mini-batch if its backward pass has completed, else drop it."""
        step, self._step = self._step, None
        self._token += 1
        if step is None:
            return
        if self._pending or not step.moments:
            self.dropped += bool(self._pending)
        else:
            for k in self.measured:
                if k not in step.moments:  # the module did not run, or its output did not reach the loss
                    z = torch.zeros(self.params[k].shape, dtype=torch.float64, device=self.params[k].device)
                    step.moments[k] = ChunkMoments(step.batch, z, z.clone(), z.clone(), z.clone())
            self.on_step(step)
        self._pending = 0
        for info in self._modules:
            info.calls.clear()

    # --- hooks ---------------------------------------------------------------------------
    def _on_forward(self, module, args):
        if not torch.is_grad_enabled():
            return
        for bn in self._batchnorms:
            if bn.training:
                raise ModelError(
                    f"online GSNR: {type(bn).__name__} in train mode normalizes with batch statistics, which "
                    "mixes the samples of a batch, so per-sample gradients are undefined; detach the online "
                    "monitor, or put the BatchNorm layers in eval mode"
                )
        self.flush()  # a new forward pass: the previous mini-batch is complete (or abandoned)

    def _make_hook(self, info: _Module):
        def hook(module, args, output):
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            a0 = args[0] if args else None
            if not isinstance(a0, torch.Tensor) or a0.ndim == 0:
                self._give_up(info, "its first input is not a tensor with the samples in dimension 0")
                return
            if self._step is None:
                self._step = StepMoments(int(a0.shape[0]))
            if int(a0.shape[0]) != self._step.batch:
                self._give_up(info, "its input does not have the batch's samples in dimension 0")
                return
            call = [[a.detach() if isinstance(a, torch.Tensor) else a for a in args], None]
            info.calls.append(call)
            self._pending += 1
            token = self._token

            def catch(grad, call=call):
                if token != self._token or info not in self._modules:
                    return  # a backward through an older forward pass
                call[1] = grad.detach()
                self._pending -= 1
                if all(c[1] is not None for c in info.calls):
                    self._reduce(info)

            output.register_hook(catch)

        return hook

    def _give_up(self, info: _Module, why: str) -> None:
        for k in info.params:
            self.unmeasured[k] = f"{info.name or type(info.module).__name__}: {why}"
        if info in self._modules:
            self._modules.remove(info)
        self._pending -= sum(c[1] is None for c in info.calls)
        info.calls.clear()
        if self._step is not None:
            for k in info.params:
                self._step.moments.pop(k, None)

    def _reduce(self, info: _Module) -> None:
        """Σg, Σg², signs of this module's parameters over the mini-batch (eq. 1, 2)."""
        assert self._step is not None
        batch = self._step.batch
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        calls, info.calls = info.calls, []
        if any(c[1].shape[0] != batch for c in calls):
            info.calls = []
            self._give_up(info, "its output does not have the batch's samples in dimension 0")
            return
        rule = find_moment_rule(info.module)
        out = None
        if len(calls) == 1 and rule is not None:
            ctx = RuleContext(calls[0][0], calls[0][1] * scale, self.signs, DEFAULT_BUDGET, None, None)
            out = rule(info.module, ctx)
            if out is not None:
                self.paths[info.name] = "online-moment-rule"
        if out is None:
            sampler = find_grad_sampler(info.module)
            if sampler is None:
                self._give_up(info, "its moment rule declined this input and it has no grad sampler")
                return
            summed: dict = {}
            for acts, bp in calls:  # a module called several times: per-sample gradients add up
                for p, g in sampler(info.module, acts, bp * scale).items():
                    summed[p] = summed[p] + g if p in summed else g
            out = {p: samples_moments(g, self.signs) for p, g in summed.items()}
            self.paths[info.name] = "online-grad-sampler"
        name_of = {id(self.params[k]): k for k in info.params}
        for p, c in out.items():
            k = name_of.get(id(p))
            if k is not None:
                self._step.moments[k] = c
