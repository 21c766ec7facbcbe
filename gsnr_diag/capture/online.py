"""Per-sample gradient moments of the user's own training mini-batches, taken during their ``loss.backward()``.

The same moment rules and grad samplers as :class:`~gsnr_diag.capture.GradientCapture`, on the real
training pass: a forward hook on every module that owns trainable parameters keeps its inputs and puts
a tensor hook on its output; when the backward pass reaches that output, the hook turns the backprops
(rescaled by the batch size for a batch-mean loss, so they are those of each sample's own loss, eq. 1)
into the module's Σg, Σg² and sign counts for that mini-batch. The hooks read tensors only: they
return nothing, so autograd, ``.grad`` and the parameters are exactly what they would be without them.

A mini-batch begins with the first hooked layer that runs with gradients enabled and ends when the
backward pass that reaches it completes (a callback queued on autograd's engine), so the model's own
``forward`` need not be the entry point (a LightningModule's ``training_step`` may call a submodule).
A forward pass of the model that is never backpropagated is dropped at the model's next forward
(counted in ``dropped``). A deep copy of the model made while attached carries our hooks, inert: they
check that they run on the attached modules. Activation checkpointing (a forward recomputed during
the backward pass) is not supported.

What cannot be measured this way is left out and named in ``unmeasured`` (never guessed): parameters
of modules with neither a moment rule nor a grad sampler (the offline capture's whole-model vmap
fallback would need a second pass), parameters shared by several modules (tied weights), and modules
whose inputs do not carry the samples in dimension 0. A BatchNorm layer in train mode mixes the
samples of a batch, so per-sample gradients are undefined: such a forward raises ``ModelError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.moments import ChunkMoments
from ..errors import ModelError
from .blocks import samples_moments
from .registry import DEFAULT_BUDGET, RuleContext, find_grad_sampler, find_moment_rule

__all__ = ["LOSS_REDUCTIONS", "LinearSums", "OnlineCapture", "StepMoments", "paused"]

LOSS_REDUCTIONS = ("mean", "sum")

_PAUSED = [0]  # > 0 while gsnr-diag's own measurement passes run (gradient_stats): not training steps


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Every online capture ignores the forward and backward passes run inside this block.

    :func:`~gsnr_diag.gradient_stats` (so also ``Monitor.record``) runs in it: a full-data snapshot
    taken while an online monitor is attached does not enter its window.
    """
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


@dataclass
class StepMoments:
    """The per-parameter moments of one training mini-batch of ``batch`` samples."""

    batch: int
    moments: dict[str, ChunkMoments] = field(default_factory=dict)
    scratch: dict | None = None  # the work buffers the rules wrote the moments into
    skipped: bool = False  # not captured (``every`` > 1): only its end is watched
    queued: bool = False  # the end-of-backward callback is queued


@dataclass
class LinearSums:
    """One mini-batch's moments of an ``nn.Linear`` weight kept as the rule's raw sums, in the compute dtype.

    ``mean`` = Σ_i g_i / B and ``total_sq`` = Σ_i g_i² = (δ²)ᵀ(a²) (eq. 1, 2); turned into float64
    :class:`~gsnr_diag.core.moments.ChunkMoments` only when the window is read, exactly as the
    moment rule does at once (M2 = Σg² − B·ḡ² in float64), so a training step pays no float64 pass.
    """

    count: int
    mean: torch.Tensor
    total_sq: torch.Tensor

    def moments(self) -> ChunkMoments:
        mean = self.mean.to(torch.float64)
        m2 = self.total_sq.to(torch.float64).addcmul_(mean, mean, value=-float(self.count)).clamp_(min=0.0)
        return ChunkMoments(self.count, mean, m2)


def _distributed() -> bool:
    """Under torch.distributed a DDP reducer may rewrite ``.grad`` (the all-reduced average): never take
    the mean from it there (safe as measured, but it rests on the order of autograd hooks)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _scratch_buffer(scratch: dict, owner: torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
    key = (id(owner), name)
    t = scratch.get(key)
    if t is None or t.shape != like.shape or t.dtype != like.dtype:
        t = scratch[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
    return t


def _linear_sums(layer: nn.Linear, a: torch.Tensor, d: torch.Tensor, scale: float, grad, scratch: dict) -> dict | None:
    """nn.Linear on [B, in] inputs, no sign counts: Σg² = (δ²)ᵀ(a²) and the mean from ``.grad`` when given.

    ``d`` are the raw backprops; the per-sample gradients are those of ``scale`` · loss (the batch size
    for a batch-mean loss), folded into a² (smaller than δ and Σg²).
    """
    W = layer.weight
    if a.ndim != 2 or d.ndim != 2 or W.dtype not in (torch.float32, torch.float64) or a.dtype != W.dtype:
        return None
    out: dict = {}
    B = int(a.shape[0])
    if W.requires_grad:
        sq = _scratch_buffer(scratch, W, "online-sq", W)
        torch.mm(d.square().t(), a.square().mul_(scale * scale), out=sq)
        mean = _scratch_buffer(scratch, W, "online-mean", W)
        if grad is not None:
            mean.copy_(grad)
        else:
            torch.mm(d.t(), a, out=mean).mul_(scale / B)
        out[W] = LinearSums(B, mean, sq)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = samples_moments(d * scale, False)
    return out


@dataclass
class _Module:
    name: str
    module: nn.Module
    params: list[str]
    calls: list = field(default_factory=list)  # [activations, backprops | None] per call in this step
    awaiting: int = 0  # parameters whose .grad must still be accumulated before the rule runs


class OnlineCapture:
    """Hooks on ``model`` that call ``on_step(StepMoments)`` once per backward pass through it.

    Args:
        model: the model being trained; hooks are added by :meth:`attach` and removed by :meth:`detach`.
        on_step: receives the moments of every completed mini-batch.
        signs: also count per-element gradient signs (same-sign fraction); extra work per step.
        loss_reduction: ``"mean"`` (the loss is the batch mean of per-sample losses, PyTorch's default)
            or ``"sum"``.
        every: capture one mini-batch in every ``every`` (1: all); the others run with the hooks idle.
        slots: how many mini-batches' moments the caller keeps at a time (e.g. a window + 1); the
            rules' work buffers cycle through that many sets, so the moments of a step stay valid
            for ``slots − 1`` further steps and no step allocates new large buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        on_step: Callable[[StepMoments], None],
        *,
        signs: bool = False,
        loss_reduction: str = "mean",
        every: int = 1,
        slots: int = 1,
    ):
        if not isinstance(model, nn.Module):
            raise ModelError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ModelError(f"every: expected a positive int (capture one mini-batch in every k), got {every!r}")
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
        self._scratch: list[dict] = [{} for _ in range(max(1, int(slots)))]
        self._slot = 0
        self.every = every
        self._forwards = -1  # mini-batches begun
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
            for k in info.params:
                q = self.params[k]
                self._handles.append(q.register_post_accumulate_grad_hook(self._make_grad_hook(info, q)))
        return self

    def detach(self) -> None:
        """Remove every hook (the model is as before attach) and deliver a completed last step."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.flush()
        self._scratch = [{} for _ in self._scratch]  # the delivered moments keep their own buffers
        for info in self._modules:
            info.calls.clear()

    def flush(self) -> None:
        """Deliver the current mini-batch if its backward pass has completed, else drop it."""
        step, self._step = self._step, None
        self._token += 1
        if step is None or step.skipped:
            self._pending = 0
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
            info.awaiting = 0

    # --- hooks ---------------------------------------------------------------------------
    def _check_batchnorm(self) -> None:
        for bn in self._batchnorms:
            if bn.training:
                raise ModelError(
                    f"online GSNR: {type(bn).__name__} in train mode normalizes with batch statistics, which "
                    "mixes the samples of a batch, so per-sample gradients are undefined; detach the online "
                    "monitor, or put the BatchNorm layers in eval mode"
                )

    def _on_forward(self, module, args):
        if module is not self.model or _PAUSED[0] or not torch.is_grad_enabled():  # (deepcopy made while attached)
            return
        self._check_batchnorm()
        self.flush()  # a new forward pass of the model: a previous one never backpropagated is dropped

    def _start_step(self, batch: int) -> StepMoments:
        """A mini-batch begins with the first hooked layer that runs with gradients after the last one ended."""
        self._check_batchnorm()  # also when the model's own forward is bypassed (e.g. a LightningModule)
        self._forwards += 1
        skipped = self._forwards % self.every != 0
        if not skipped:
            self._slot = (self._slot + 1) % len(self._scratch)
        self._step = StepMoments(batch, scratch=None if skipped else self._scratch[self._slot], skipped=skipped)
        return self._step

    def _backward_reached(self, step: StepMoments) -> None:
        """Called from a tensor hook: the mini-batch ends when this backward pass completes."""
        if not step.queued:
            step.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end_of_backward(step))

    def _end_of_backward(self, step: StepMoments) -> None:
        if self._step is step:
            self.flush()

    def _make_hook(self, info: _Module):
        def hook(module, args, output):
            if module is not info.module or _PAUSED[0]:  # a deepcopy made while attached carries the hook
                return
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            a0 = args[0] if args else None
            step = self._step
            if step is None:
                step = self._start_step(int(a0.shape[0]) if isinstance(a0, torch.Tensor) and a0.ndim else 0)
            if step.skipped:
                if not step.queued:
                    output.register_hook(lambda grad, step=step: self._backward_reached(step))
                return
            if not isinstance(a0, torch.Tensor) or a0.ndim == 0:
                self._give_up(info, "its first input is not a tensor with the samples in dimension 0")
                return
            if int(a0.shape[0]) != step.batch:
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
                self._backward_reached(step)
                if all(c[1] is not None for c in info.calls):
                    params = [self.params[k] for k in info.params]
                    reuse = len(info.calls) == 1 and find_moment_rule(module) and not _distributed()
                    if reuse and all(q.grad is None for q in params):
                        # .grad is about to become exactly this batch's mean gradient: the rule takes the
                        # mean from it instead of recomputing Σg (the saving of the offline capture's grads).
                        info.awaiting = len(params)
                        self._pending += 1
                    else:
                        self._reduce(info, None)

            output.register_hook(catch)

        return hook

    def _make_grad_hook(self, info: _Module, own: torch.Tensor):
        def grad_hook(param):
            if param is not own or info.awaiting <= 0 or info not in self._modules:
                return
            info.awaiting -= 1
            if info.awaiting == 0:
                self._pending -= 1
                batch = self._step.batch if self._step is not None else 1
                scale = 1.0 if self.loss_reduction == "mean" else 1.0 / batch  # the mean Σg / B
                params = [self.params[k] for k in info.params]
                self._reduce(info, {q: q.grad if scale == 1.0 else q.grad * scale for q in params})

        return grad_hook

    def _give_up(self, info: _Module, why: str) -> None:
        for k in info.params:
            self.unmeasured[k] = f"{info.name or type(info.module).__name__}: {why}"
        if info in self._modules:
            self._modules.remove(info)
        self._pending -= sum(c[1] is None for c in info.calls) + (info.awaiting > 0)
        info.awaiting = 0
        info.calls.clear()
        if self._step is not None:
            for k in info.params:
                self._step.moments.pop(k, None)

    def _reduce(self, info: _Module, grads: dict | None) -> None:
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
        if len(calls) == 1 and type(info.module) is nn.Linear and not self.signs:
            W = info.module.weight
            g = None if grads is None else grads.get(W)
            out = _linear_sums(info.module, calls[0][0][0], calls[0][1], scale, g, self._step.scratch)
            if out is not None:
                self.paths[info.name] = "online-linear-sums"
        if out is None and len(calls) == 1 and rule is not None:
            bp = calls[0][1] * scale
            ctx = RuleContext(calls[0][0], bp, self.signs, DEFAULT_BUDGET, grads, self._step.scratch)
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
