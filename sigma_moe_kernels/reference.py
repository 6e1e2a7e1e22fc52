"""Plain-torch references of every op (autograd through torch ops; slow, obviously right).

``K.reference.topk_route``, ``K.reference.permute``, ``K.reference.unpermute``,
``K.reference.grouped_swiglu``, ``K.reference.linear_cross_entropy`` have the same signatures as the ops (minus ``backend``).
"""

from .grouped_swiglu import grouped_swiglu_reference as grouped_swiglu
from .linear_ce import linear_cross_entropy_reference as linear_cross_entropy
from .permute import permute_reference as permute
from .permute import unpermute_reference as unpermute
from .topk_route import topk_route_reference as topk_route

__all__ = ["topk_route", "permute", "unpermute", "grouped_swiglu", "linear_cross_entropy"]
