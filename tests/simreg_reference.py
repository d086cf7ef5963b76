"""Naive SimReg: loops over anchors in float64, written straight from the paper's Eq. 3.

Independent of `megatron_simreg.simreg` on purpose: no tiles, no saved log-sum-exps, autograd for
gradients. The tests compare the fast implementation against it.
"""

import math

import torch
import torch.nn.functional as F


def reference_terms(hidden, labels, loss_mask=None, temperature=0.01, chunk_size=None):
    """Lsr per token [b, s] in float64; masked positions hold 0."""
    b, s, _ = hidden.shape
    mask = torch.ones(b, s, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    units = F.normalize(hidden.double(), dim=-1)
    terms = []
    for sample in range(b):
        for i in range(s):
            if not mask[sample, i]:
                terms.append(torch.zeros((), dtype=torch.float64))
                continue
            start = 0 if chunk_size is None else (i // chunk_size) * chunk_size
            end = s if chunk_size is None else min(start + chunk_size, s)
            positives, negatives = [], []
            for j in range(start, end):
                if not mask[sample, j]:
                    continue
                logit = torch.dot(units[sample, i], units[sample, j]) / temperature
                (positives if labels[sample, j] == labels[sample, i] else negatives).append(logit)
            log_neg = torch.logsumexp(torch.stack(negatives), 0) if negatives else torch.tensor(-math.inf, dtype=torch.float64)
            terms.append(log_neg - torch.logsumexp(torch.stack(positives), 0))
    return torch.stack(terms).view(b, s)


def reference_loss(hidden, labels, loss_mask=None, temperature=0.01, chunk_size=None, reduction="group"):
    """Each sequence's mean softplus(Lsr) over its (chunk, label) groups' means ("group") or over its anchors
    ("token"); then the mean over sequences weighted by their valid tokens."""
    b, s, _ = hidden.shape
    mask = torch.ones(b, s, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
    terms = reference_terms(hidden, labels, mask, temperature, chunk_size)
    values, tokens = [], []
    for sample in range(b):
        groups: dict[tuple, list] = {}
        for i in range(s):
            if mask[sample, i]:
                chunk = 0 if chunk_size is None else i // chunk_size
                groups.setdefault((chunk, int(labels[sample, i])), []).append(F.softplus(terms[sample, i]))
        if not groups:
            continue
        members = [v for group in groups.values() for v in group]
        if reduction == "token":
            values.append(torch.stack(members).mean())
        else:
            values.append(torch.stack([torch.stack(group).mean() for group in groups.values()]).mean())
        tokens.append(len(members))
    if not values:
        return hidden.sum() * 0.0
    return sum(value * count for value, count in zip(values, tokens)) / sum(tokens)
