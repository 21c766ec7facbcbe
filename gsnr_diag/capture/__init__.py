"""Per-sample gradient moments of one chunk (hooks, moment rules, grad samplers, fallback).

Importing this package registers every layer family's rule and sampler.
"""

from . import attention, conv, embedding, embedding_bag, hf, linear, norm, tied  # noqa: F401 - registers the rules
from .capture import PATH_FUNCTORCH, PATH_LOOP, PATH_RULE, PATH_SAMPLER, GradientCapture
from .registry import RuleContext, find_grad_sampler, find_moment_rule, register_grad_sampler, register_moment_rule

__all__ = [
    "PATH_FUNCTORCH",
    "PATH_LOOP",
    "PATH_RULE",
    "PATH_SAMPLER",
    "GradientCapture",
    "RuleContext",
    "find_grad_sampler",
    "find_moment_rule",
    "register_grad_sampler",
    "register_moment_rule",
]
