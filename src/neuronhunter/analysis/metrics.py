"""Selectivity metrics shared by the hunt (real neurons) and the superposition lab (toy neurons).

Both score a neuron from its mean response to each concept, so toy and real neurons are judged the same way.

* **CRS**, concept response selectivity::

      CRS = (r_max - r_second) / r_max

  over the neuron's mean responses ``r`` to the concepts. 1 means the neuron answers one concept only; near 0
  means two or more concepts drive it equally (polysemantic). Responses are clipped at 0 first (a ReLU/GELU-style
  neuron "responds" by being positive); when ``r_max <= 0`` the neuron responds to nothing and CRS is 0.
* **Response entropy**: the Shannon entropy (bits) of the positive response mass ``p_c = r_c^+ / sum r^+`` over
  concepts; 0 for one concept, ``log2(C)`` for a uniform response.
* **Weight entropy**: the entropy (nats) of a neuron's normalised absolute incoming weights ``|w| / sum|w|``.
* **Angular distance**: the angle in degrees between two weight vectors, ``arccos(cos_sim)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def crs(responses: Tensor, eps: float = 1e-12) -> Tensor:
    """Concept response selectivity over the last dimension.

    Args:
        responses: mean responses, shape ``[..., concepts]`` (at least 2 concepts).

    Returns:
        CRS in ``[0, 1]``, shape ``[...]``.
    """
    if responses.shape[-1] < 2:
        raise ValueError("CRS needs at least two concepts")
    r = responses.clamp(min=0).to(torch.float64)
    top2 = r.topk(2, dim=-1).values
    r_max, r_second = top2[..., 0], top2[..., 1]
    out = torch.where(r_max > eps, (r_max - r_second) / r_max.clamp(min=eps), torch.zeros_like(r_max))
    return out.to(responses.dtype if responses.is_floating_point() else torch.float64)


def response_entropy(responses: Tensor, eps: float = 1e-12) -> Tensor:
    """Entropy in bits of the positive response mass over concepts (last dim); 0 where nothing is positive."""
    r = responses.clamp(min=0).to(torch.float64)
    total = r.sum(-1, keepdim=True)
    p = r / total.clamp(min=eps)
    h = -(p * torch.log2(p.clamp(min=eps))).sum(-1)
    return torch.where(total.squeeze(-1) > eps, h, torch.zeros_like(h))


def weight_entropy(weights: Tensor, eps: float = 1e-12) -> Tensor:
    """Entropy (nats) of each row's normalised absolute weights. ``weights``: ``[neurons, inputs]`` -> ``[neurons]``."""
    a = weights.abs().to(torch.float64)
    p = a / a.sum(-1, keepdim=True).clamp(min=eps)
    return -(p * torch.log(p.clamp(min=eps))).sum(-1)


def angular_distance(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Angle in degrees between vectors along the last dim (broadcasting)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    cos = (a64 * b64).sum(-1) / (a64.norm(dim=-1) * b64.norm(dim=-1)).clamp(min=eps)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def mean_pairwise_angle(weights: Tensor) -> float:
    """Mean angular distance (degrees) over all distinct pairs of rows of ``weights`` ``[neurons, inputs]``."""
    n = weights.shape[0]
    if n < 2:
        return float("nan")
    w = weights.to(torch.float64)
    w = w / w.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    cos = (w @ w.T).clamp(-1.0, 1.0)
    iu = torch.triu_indices(n, n, offset=1)
    return float(torch.rad2deg(torch.arccos(cos[iu[0], iu[1]])).mean())
