"""Registries of per-layer-type moment rules and grad samplers, looked up by exact module type (as Opacus).

* A **moment rule** ``rule(layer, ctx: RuleContext) -> {param: ChunkMoments} | None`` gives one chunk's
  Σg, Σg² and sign counts (eq. 1, 2 and the same-sign count) *without* keeping the per-sample
  gradients of the whole chunk: by algebra where it allows (nn.Linear on 2-D input, Embedding),
  otherwise block by block over samples so that no materialized block exceeds ``ctx.budget`` bytes.
  A rule returns ``None`` to decline (e.g. an input shape it does not handle). It is used when a
  layer is called once and its parameters are not shared.
* A **grad sampler** ``sampler(layer, activations, backprops) -> {param: grad_sample [B, *shape]}``
  has Opacus' signature; ours cover layers Opacus has none for (BatchNorm in eval mode), Opacus'
  own ``GradSampleModule.GRAD_SAMPLERS`` serve the rest.

Both see backprops already rescaled to the gradient of each sample's own loss (Opacus'
``loss_reduction="mean"`` convention). To support a new layer type, put its rule (and, if useful,
its sampler) in a module of this package, register it with the decorators below, and import that
module in ``capture/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

#: Default bound on the bytes of one materialized block (``gradient_stats(max_memory_mb=512)``).
DEFAULT_MAX_MEMORY_MB = 512
DEFAULT_BUDGET = DEFAULT_MAX_MEMORY_MB * 2**20


@dataclass
class RuleContext:
    """What a moment rule sees of one call of its layer in one chunk.

    ``activations``: the layer's positional inputs (detached); ``backprops``: ∂(per-sample loss)/∂output,
    ``[B, ...]``; ``signs``: whether to count signs; ``budget``: bytes one materialized block may hold;
    ``grads``: parameter → batch gradient ∂L/∂θ = Σ_i g_i / B (autograd computed it already; a rule may
    take the mean from it); ``scratch``: a dict kept across chunks for work buffers (the ChunkMoments a
    rule returns may live in them, valid until the next chunk); ``kwargs``: the keyword inputs of the call;
    ``inner``: what the rule's own ``inner`` hook (``rule.inner(layer, args, output)``, run in the forward
    hook) caught inside the layer's forward, or ``None``.
    """

    activations: list
    backprops: torch.Tensor
    signs: bool = True
    budget: float = DEFAULT_BUDGET
    grads: Mapping | None = None
    scratch: dict | None = field(default=None)
    kwargs: dict = field(default_factory=dict)
    inner: object = None


MomentRule = Callable[[nn.Module, RuleContext], "dict | None"]
GradSampler = Callable[[nn.Module, list, torch.Tensor], dict]

MOMENT_RULES: dict[type, MomentRule] = {}
GRAD_SAMPLERS: dict[type, GradSampler] = {}
#: Layer types whose samples are the rows of their *output* (their input need not be ``[B, ...]``, e.g.
#: EmbeddingBag's flat indices with offsets) and that have no grad sampler (Opacus' would ignore keyword inputs).
OUTPUT_BATCHED: set[type] = set()
# Layer types of optional libraries, keyed by "module.QualName" so that registering them imports nothing.
MOMENT_RULES_BY_NAME: dict[str, MomentRule] = {}
GRAD_SAMPLERS_BY_NAME: dict[str, GradSampler] = {}


def type_name(cls: type) -> str:
    """``"module.QualName"`` of a class: the key of the by-name registries."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_moment_rule(*classes: type | str) -> Callable[[MomentRule], MomentRule]:
    """Decorator: register ``rule(layer, ctx)`` as the moment rule of ``classes`` (types or "module.QualName")."""

    def decorator(f: MomentRule) -> MomentRule:
        for cls in classes:
            if isinstance(cls, str):
                MOMENT_RULES_BY_NAME[cls] = f
            else:
                MOMENT_RULES[cls] = f
        return f

    return decorator


def register_grad_sampler(*classes: type | str) -> Callable[[GradSampler], GradSampler]:
    """Decorator: register ``sampler(layer, activations, backprops)`` as a per-sample gradient sampler."""

    def decorator(f: GradSampler) -> GradSampler:
        for cls in classes:
            if isinstance(cls, str):
                GRAD_SAMPLERS_BY_NAME[cls] = f
            else:
                GRAD_SAMPLERS[cls] = f
        return f

    return decorator


def find_grad_sampler(layer: nn.Module) -> GradSampler | None:
    """Our sampler for ``type(layer)``, else Opacus', else ``None``."""
    cls = type(layer)
    if cls in OUTPUT_BATCHED:
        return None
    if cls in GRAD_SAMPLERS:
        return GRAD_SAMPLERS[cls]
    if type_name(cls) in GRAD_SAMPLERS_BY_NAME:
        return GRAD_SAMPLERS_BY_NAME[type_name(cls)]
    from opacus.grad_sample import GradSampleModule

    return GradSampleModule.GRAD_SAMPLERS.get(cls)


def find_moment_rule(layer: nn.Module) -> MomentRule | None:
    """The moment rule for this layer's type, or ``None`` (a rule may still decline by input shape)."""
    cls = type(layer)
    return MOMENT_RULES.get(cls) or MOMENT_RULES_BY_NAME.get(type_name(cls))
