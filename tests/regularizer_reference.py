"""Naive float64 versions of the baseline regularizers, written from their formulas (docs/baselines.md).

Independent of `megatron_simreg.regularizers` on purpose: loops over sequences, anchors and partners, no
tiles, no batching of segments, autograd for gradients. Each takes batch-major `[b, s, h]` tensors and returns
the batch value: the sum over valid tokens of L_i divided by the number of valid tokens.
"""

import math

import torch
import torch.nn.functional as F


def _segment(i, s, chunk_size):
    start = 0 if chunk_size is None else (i // chunk_size) * chunk_size
    return range(start, s if chunk_size is None else min(start + chunk_size, s))


def _anchors(mask):
    """(sequence, position) of every valid token."""
    return [(x, i) for x in range(mask.shape[0]) for i in range(mask.shape[1]) if mask[x, i]]


def _mean(per_token, mask):
    total = sum(per_token) if per_token else torch.zeros((), dtype=torch.float64)
    return total / max(int(mask.sum()), 1)


def _cos(x, y):
    return torch.dot(F.normalize(x, dim=0), F.normalize(y, dim=0))


def simcse(a, b, mask, temperature, chunk_size=None):
    """L_i = -log softmax over the segment's valid j of cos(a_i, b_j) / tau, at j = i."""
    s = a.shape[1]
    losses = []
    for x, i in _anchors(mask):
        keys = [j for j in _segment(i, s, chunk_size) if mask[x, j]]
        logits = torch.stack([_cos(a[x, i], b[x, j]) / temperature for j in keys])
        losses.append(torch.logsumexp(logits, 0) - logits[keys.index(i)])
    return _mean(losses, mask)


def cpretrain(h, e, labels, mask, scale, chunk_size=None):
    """Symmetric InfoNCE between tokens and their label embeddings; same-label partners are not negatives.
    Token -> labels: each other label of the segment once (its embedding e is a function of the label);
    label -> tokens: every other-label token."""
    s = h.shape[1]
    losses = []
    for x, i in _anchors(mask):
        positive = scale * _cos(h[x, i], e[x, i])
        others = [j for j in _segment(i, s, chunk_size) if mask[x, j] and labels[x, j] != labels[x, i]]
        first_of_label = {}
        for j in others:
            first_of_label.setdefault(int(labels[x, j]), j)
        directions = []
        for anchor, partner, keys in ((h, e, list(first_of_label.values())), (e, h, others)):
            negatives = [scale * _cos(anchor[x, i], partner[x, j]) for j in keys]
            directions.append(torch.logsumexp(torch.stack([positive] + negatives), 0) - positive)
        losses.append((directions[0] + directions[1]) / 2)
    return _mean(losses, mask)


def creg_contrastive(h, labels, mask, temperature, chunk_size=None):
    """Per anchor: mean over same-label partners (not itself) of -log sigmoid(z) plus mean over other-label
    partners of -log(1 - sigmoid(z)), z = cos / tau."""
    s = h.shape[1]
    losses = []
    for x, i in _anchors(mask):
        positives, negatives = [], []
        for j in _segment(i, s, chunk_size):
            if not mask[x, j] or j == i:
                continue
            z = _cos(h[x, i], h[x, j]) / temperature
            if labels[x, j] == labels[x, i]:
                positives.append(-torch.log(torch.sigmoid(z)))
            else:
                negatives.append(-torch.log(1 - torch.sigmoid(z)))
        term = torch.zeros((), dtype=torch.float64)
        for group in (positives, negatives):
            if group:
                term = term + sum(group) / len(group)
        losses.append(term)
    return _mean(losses, mask)


def jensen_shannon(logits_p, logits_q, mask):
    """Mean over valid tokens of (KL(p || m) + KL(q || m)) / 2, written with probabilities."""
    p, q = torch.softmax(logits_p.double(), -1), torch.softmax(logits_q.double(), -1)
    m = (p + q) / 2
    per_token = ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1)) / 2
    return _mean([per_token[x, i] for x, i in _anchors(mask)], mask)


def sce(online, target, mask, temperature, target_temperature, mix, chunk_size=None):
    """-sum_k w_ik log p_ik with w = mix * one-hot + (1 - mix) * softmax_{k != i}(target similarities / tau_m)
    (one-hot alone when i has no other valid partner); p = softmax_k(cos(online_i, target_k) / tau)."""
    s = online.shape[1]
    target = target.detach()
    losses = []
    for x, i in _anchors(mask):
        keys = [j for j in _segment(i, s, chunk_size) if mask[x, j]]
        log_p = torch.log_softmax(torch.stack([_cos(online[x, i], target[x, k]) / temperature for k in keys]), 0)
        others = [k for k in keys if k != i]
        weights = torch.zeros(len(keys), dtype=torch.float64)
        if others:
            logits = torch.stack([_cos(target[x, i], target[x, k]) / target_temperature for k in others])
            for k, w in zip(others, torch.softmax(logits, 0)):
                weights[keys.index(k)] = (1 - mix) * w
            weights[keys.index(i)] = mix
        else:
            weights[keys.index(i)] = 1.0
        losses.append(-(weights * log_p).sum())
    return _mean(losses, mask)


def ema(average, weight, momentum):
    """The momentum encoder's update (SCE's `_update_weights`): momentum * average + (1 - momentum) * weight."""
    return momentum * average + (1 - momentum) * weight


def log_scale(temperature):
    return math.log(1.0 / temperature)
