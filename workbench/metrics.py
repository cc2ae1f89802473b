"""Distances between distributions and sets, one copy each, safe where probabilities are 0.

Every layer may use these (comparisons of interventions, of presets, corpus statistics, views).
"""
from __future__ import annotations

import math

import torch


def kl_divergence(p_logits_or_logp: torch.Tensor, q_logits_or_logp: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """KL(p || q) in nats over `dim`, from logits or log-probabilities (normalised here).

    Where p is 0 the term is 0, also where q is 0 there (0 log 0/0 = 0); where p > 0 and q = 0 it is +inf,
    as it should be. Computed in float32 or wider.
    """
    logp = torch.log_softmax(p_logits_or_logp.float(), dim=dim)
    logq = torch.log_softmax(q_logits_or_logp.float(), dim=dim)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=logp.dtype, device=logp.device))
    return terms.sum(dim).clamp_min(0.0)


def entropy_bits(probs: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in bits of probabilities along `dim` (0 log 0 = 0, so masked entries count nothing).
    Rows need not sum to 1: a gpt-oss attention row without its sink column gives the entropy of that part."""
    return -torch.special.xlogy(probs, probs).sum(dim) / math.log(2)


def entropy_bits_from_logits(logits: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """Entropy in bits of softmax(logits) along `dim`, in float32 or wider."""
    return entropy_bits(torch.softmax(logits.float(), dim=dim), dim=dim)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|A ∩ B| / |A ∪ B| of index sets along the last dim ([..., k] each, no repeats within a set)."""
    inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).double()
    return inter / (a.shape[-1] + b.shape[-1] - inter)
