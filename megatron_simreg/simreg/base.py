"""What every SimReg kernel shares: the constants, the precision context and the per-token arithmetic.

The tiles, the whole-matrix kernel and the Triton kernel compute the same values with the same floors: the set
sizes |P_i| and |N_i|, the unit vectors' scales, Lsr from the two log-sum-exps, the shifted sums and their
combination, the angle statistic, the backward's pair weights and the normalisation's backward. Keeping them
here is what keeps the kernels' arithmetic identical.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

from megatron_simreg.simreg.plan import _blocks, _Plan, _segment_parts

NORM_EPS = 1e-12
"""Embeddings with a smaller norm are treated as `h / NORM_EPS` (as `F.normalize`): zero stays zero."""


MASKED = 1e30
"""Subtracted from the logits of pairs outside a set: after the shift and EXP_FLOOR their exponential is
e^-80, below float32's resolution of any sum here; unlike -inf, MASKED - MASKED is 0, not NaN."""


EXP_FLOOR = -80.0
"""Exponents are raised to at least this before `exp`: e^-80 ~ 1.8e-35 is still a normal float32, so no
subnormal number reaches an `exp`, a product or a matrix product (x86 CPUs take up to ~200x longer on those,
as the logits span 2/tau = 200 at tau = 0.01), and `exp` never sees -1e30 either (its vectorised version
takes ~100x longer on arguments that far out). What the floor adds stays below float32's resolution: every
sum is taken relative to its largest term (>= 1), and in backward every term is a softmax weight (sum 1)."""


NEGLIGIBLE_WEIGHT = 2 * math.exp(EXP_FLOOR)
"""Backward's pair weights at or below this (the floor's e^-80, from pairs whose true weight is smaller still)
become 0 before the matrix products: e^-80 times a unit component below ~1e-3 is a subnormal product, and the
rows of anchors whose gradient has vanished (Lsr far below 0, softplus' slope ~1e-40) are all floor, which
doubled the time of the products on x86 CPUs. Each such pair moves the gradient by less than 1e-33."""


_precision_lock = threading.Lock()
_precision_depth = 0
_precision_saved: tuple[str, str] | None = None


@contextlib.contextmanager
def ieee_fp32_products():
    """Float32 matrix products in IEEE precision inside, whatever the global setting (TF32 on GPUs, which NGC
    images turn on with TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1; bf16 in oneDNN on CPUs). At tau = 0.01 a logit is a
    cosine times 100: TF32's 2^-11 rounding of the inputs moves it by ~1e-2 and the loss by ~1e-5 relative.

    torch keeps the setting per process, not per thread: the first holder saves and sets it, the last restores
    it (also on exceptions); other threads' float32 products in between run in IEEE precision too.
    """
    global _precision_depth, _precision_saved
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    with _precision_lock:
        if _precision_depth == 0:
            _precision_saved = tuple(backend.fp32_precision for backend in backends)
            for backend in backends:
                backend.fp32_precision = "ieee"
        _precision_depth += 1
    try:
        yield
    finally:
        with _precision_lock:
            _precision_depth -= 1
            if _precision_depth == 0:
                for backend, precision in zip(backends, _precision_saved):
                    backend.fp32_precision = precision


def _set_sizes(anchor_ids, key_ids, key_valid, anchor_valid, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """|P_i| and |N_i| per anchor (`dtype`), |N_i| = 0 for invalid anchors: an anchor has a term iff |N_i| > 0."""
    positive = _positive_counts(anchor_ids, key_ids, key_valid).to(dtype)
    return positive, _negative_counts(positive, key_valid, anchor_valid)


def _negative_counts(positive: torch.Tensor, key_valid: torch.Tensor, anchor_valid: torch.Tensor) -> torch.Tensor:
    """|N_i| from |P_i|: the valid keys not in P_i, 0 for invalid anchors."""
    return (key_valid.sum(-1, keepdim=True, dtype=positive.dtype) - positive) * anchor_valid


def _positive_counts(anchor_labels: torch.Tensor, key_labels: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """|P_i| for every anchor (invalid ones too): the valid keys of its segment with its label, by sorting, not
    pairs. A valid key with label l sorts as 2l, an invalid one as 2l + 1; an anchor counts the keys at 2l."""
    keys = torch.sort(key_labels * 2 + key_valid.logical_not(), dim=-1).values
    wanted = anchor_labels * 2
    return torch.searchsorted(keys, wanted, right=True) - torch.searchsorted(keys, wanted)


def _lsr(lse_pos: torch.Tensor, lse_neg: torch.Tensor, negative_count: torch.Tensor):
    """Lsr per anchor, and lse_neg as backward reads it: both -inf for anchors without a term."""
    has_term = negative_count > 0
    lse_neg = torch.where(has_term, lse_neg, -math.inf)
    return torch.where(has_term, lse_neg - lse_pos, -math.inf), lse_neg


def _anchor_gradients(grad_lsr: torch.Tensor, lse_neg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d Lsr_i in `dtype`, 0 for anchors without a term (masked, or N_i empty: lse_neg = -inf)."""
    return torch.where(lse_neg > -math.inf, grad_lsr.to(dtype), 0.0)


def _token_scales(hidden: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of `hidden` `[b, s, h]`: the scale 1 / (max(|h|, eps) sqrt(tau)) that makes z_ij = u_i . u_j,
    and whether |h| < NORM_EPS (a short vector: |u| < 1, so z_ii = 1/tau no longer bounds its row)."""
    norms = torch.linalg.vector_norm(hidden, dim=-1, dtype=plan.dtype)
    return (norms.clamp_min(NORM_EPS) * math.sqrt(1.0 / plan.inv_temperature)).reciprocal_(), norms < NORM_EPS


def _segment_units(hidden: torch.Tensor, token_scale: torch.Tensor, segment: int, length: int, dtype: torch.dtype):
    """`hidden * token_scale` (z_ij = units_i . units_j) cut into segments `[batch, length, h]` (`dtype`), each
    padded with zero vectors to `length` tokens."""
    b, s, h = hidden.shape
    units = hidden.new_empty((b, -(-s // segment), length, h), dtype=dtype)
    if units.numel() == hidden.numel():  # whole segments, no padding: one product
        torch.mul(hidden, token_scale[..., None], out=units.view(b, s, h))
        return units.view(-1, length, h)
    units[:, :, segment:] = 0
    for (part, at), (part_scale, _) in zip(_segment_parts(hidden, segment), _segment_parts(token_scale, segment)):
        units[:, at, part.shape[2] : segment] = 0  # the tail of a shorter last segment
        torch.mul(part, part_scale[..., None], out=units[:, at, : part.shape[2]])
    return units.view(-1, length, h)


def _gradient_in_layout(grad_units: torch.Tensor, token_scale: torch.Tensor, hidden: torch.Tensor, segment: int):
    """d loss / d hidden = scale * (d loss / d units, radial part dropped), in the input's own memory layout, so
    adding it to the other gradients of `hidden` (and what reduces them downstream) runs in the same order as
    without SimReg: lambda = 0 changes no bit."""
    grad_hidden = torch.empty_like(hidden)
    if grad_units.numel() == hidden.numel():  # whole segments, no padding: one product
        torch.mul(grad_units.view(hidden.shape), token_scale[..., None], out=grad_hidden)
        return grad_hidden
    segmented = grad_units.unflatten(0, (hidden.shape[0], -1))
    parts = zip(_segment_parts(grad_hidden, segment), _segment_parts(token_scale, segment))
    for (part, at), (part_scale, _) in parts:
        torch.mul(segmented[:, at, : part.shape[2]], part_scale[..., None], out=part)
    return grad_hidden


def _same_label(row_labels: torch.Tensor, col_labels: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """1.0 where the labels agree, else 0.0, written straight into the float tile (one pass; a boolean mask and
    its conversion took eight times as long on CPU)."""
    return torch.eq(row_labels[:, :, None], col_labels[:, None, :], out=out)


def _positive_terms(z: torch.Tensor, same: torch.Tensor, plan: _Plan, out: torch.Tensor) -> torch.Tensor:
    """exp(z - 1/tau) at positive pairs, 0 elsewhere, into `out` (which may be z): the largest positive logit of
    a normalised anchor is its own, 1/tau, so these are the positives' shifted terms for rows and columns alike."""
    return torch.sub(z, plan.inv_temperature, out=out).clamp_min_(EXP_FLOOR).exp_().mul_(same)


def _shifted_sums(masked: torch.Tensor, dim: int):
    """(max, sum of exp(x - max)) along `dim` of a tile whose pairs outside the set hold -MASKED; in place."""
    top = masked.amax(dim, keepdim=True).clamp_min_(-MASKED / 2)  # an empty set keeps a finite max
    return top.squeeze(dim), masked.sub_(top).clamp_min_(EXP_FLOOR).exp_().sum(dim)


def _combine(maxes: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp of a set from its tiles' partial (max, sum) pairs along the last dim."""
    if maxes.shape[-1] == 1:  # one key block: nothing to rescale
        return sums.squeeze(-1).log() + maxes.squeeze(-1)
    top = maxes.amax(-1, keepdim=True)
    return (sums * (maxes - top).clamp_min_(EXP_FLOOR).exp_()).sum(-1).log_() + top.squeeze(-1)


def _negative_angles(z, same, plan: _Plan, out, valid) -> torch.Tensor:
    """The angles (radians) of the strip's different-label pairs, 0 elsewhere (and, with `valid`, at invalid pairs)."""
    radians = torch.mul(z, 1.0 / plan.inv_temperature, out=out).clamp_(-1.0, 1.0).acos_()
    radians.addcmul_(radians, same, value=-1.0)
    if valid is not None:
        radians.mul_(valid[0][:, :, None]).mul_(valid[1][:, None, :])
    return radians


def _logit_weights(lse_pos: torch.Tensor, lse_neg: torch.Tensor, grad: torch.Tensor):
    """Per anchor (shift, step, sign): grad_i * |d Lsr_i / d z_ij| = sign_i * exp(z_ij - shift_i + same_ij * step_i).

    d Lsr_i / d z_ij is the softmax over N_i (for negatives) minus the softmax over P_i (for positives); log|g_i| is
    folded into the exponent, so the tile's exponentials are already the gradient's magnitudes.
    """
    live = grad != 0  # other rows are zeroed by their sign; MASKED keeps their exponentials finite till then
    shift = torch.where(live, lse_neg - grad.abs().log(), MASKED)
    step = torch.where(live, lse_neg - lse_pos, 0.0)
    return shift, step, grad.sign()


def _pair_weights(z, same, shift, step, out: torch.Tensor | None = None) -> torch.Tensor:
    """|G_ij| = exp(z_ij - shift + same_ij * step) (see `_logit_weights`, broadcast along the anchors' side), into
    `out` if given (which may be z), floored and with the floor's negligible weights set to 0."""
    weights = torch.sub(z, shift, out=out).addcmul_(same, step).clamp_min_(EXP_FLOOR).exp_()
    return torch.threshold_(weights, NEGLIGIBLE_WEIGHT, 0.0)


def _drop_radial_part_(grad_units: torch.Tensor, units: torch.Tensor, short: torch.Tensor | None, plan: _Plan) -> None:
    """The normalisation's backward but for the final factor: units = h * scale, scale = 1 / (max(|h|, eps)
    sqrt(tau)), so d loss / d h = scale * (g - tau (units . g) units), the radial part dropping out unless
    |h| < eps (`short`; None: no such vector) (g = d loss / d units, changed in place; the caller multiplies by
    the scale)."""
    flat_units, grads = units.view(-1, units.shape[-1]), grad_units.view(-1, grad_units.shape[-1])
    blocks = _blocks(flat_units.shape[0], plan.block_size)
    radial = [torch.linalg.vecdot(flat_units[at], grads[at]) for at in blocks]
    radial = (radial[0] if len(radial) == 1 else torch.cat(radial)).view(units.shape[:-1])
    radial.mul_(1.0 / plan.inv_temperature)
    if short is not None:
        radial.masked_fill_(short, 0.0)
    grad_units.addcmul_(units, radial[..., None], value=-1.0)
