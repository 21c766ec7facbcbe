"""Dataclass fields derived on first read (GradientStats' aggregates): a descriptor and its sentinel."""

from __future__ import annotations

__all__ = ["Derived", "PENDING"]


class _Pending:
    """The value of a derived field not computed yet (see :class:`Derived`)."""

    def __repr__(self) -> str:
        return "<pending>"

    def __reduce__(self):
        return "PENDING"


PENDING = _Pending()


class Derived:
    """A :class:`GradientStats` field derived from the moments, computed (all together) on first read.

    ``gradient_stats`` returns as soon as the moments are finished; GSNR tensors, quantiles, sign
    statistics and the other aggregates (≈ 45 passes over the parameters, 38 ms for 670k elements)
    are formed when one of them is first read, then cached. A value passed to the constructor is
    kept as given (``from_dict``, ``dataclasses.replace``).
    """

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return PENDING  # the dataclass default
        value = obj.__dict__.get(self.slot, PENDING)
        if value is PENDING:
            obj._derive()
            value = obj.__dict__[self.slot]
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value
