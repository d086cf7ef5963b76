"""SimReg against the naive float64 reference: values, gradients, layouts, edge cases, memory."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from simreg_reference import reference_loss, reference_terms

from megatron_simreg.simreg import dense as simreg_dense
from megatron_simreg.simreg import simreg_loss, simreg_terms


def clustered(b, s, h, labels=5, spread=0.3, seed=0, dtype=torch.float64):
    """Embeddings around a few directions, labels drawn independently: negatives lie close by,
    so Lsr is of order one even at tau = 0.01 (random vectors would make it vanish)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, h, generator=gen, dtype=torch.float64)
    hidden = centers[torch.randint(0, 3, (b, s), generator=gen)]
    hidden = hidden + spread * torch.randn(b, s, h, generator=gen, dtype=torch.float64)
    return hidden.to(dtype), torch.randint(0, labels, (b, s), generator=gen)


def random_mask(b, s, keep=0.8, seed=1):
    return torch.rand(b, s, generator=torch.Generator().manual_seed(seed)) < keep


# Tolerances. float64 against the float64 reference: the two differ only in summation order (tiles, online
# log-sum-exps), ~1e-16 of logits up to 1/tau = 100: 1e-10 on values, 1e-8 on gradients (sums of many such terms).
# fp32 math: a cosine of h-dimensional units is within ~h * 2^-24 of exact, and 1/tau = 100 scales that into the
# logits: ~1e-4 at h = 64, hence the 1e-4-level tolerances wherever fp32 meets float64.


WHOLE = 10_000
"""A block size whose tile holds every pair of these tests' batches: the whole-matrix kernel (simreg.dense) runs
instead of the tiles; tests parametrised with it and a small block size check both PyTorch kernels."""


def both_gradients(fast, slow, hidden):
    a = hidden.detach().clone().requires_grad_()
    b = hidden.detach().clone().requires_grad_()
    fast(a).backward()
    slow(b).backward()
    return a.grad, b.grad


@pytest.mark.parametrize("block_size", [5, WHOLE], ids=["tiles", "whole"])
@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("chunk_size", [None, 8, 7, 3])  # 3: two chunks share a 5 x 5 tile
def test_terms_match_reference(temperature, chunk_size, block_size):
    hidden, labels = clustered(2, 24, 16, spread=0.3 if temperature == 0.01 else 1.0)
    mask = random_mask(2, 24)
    ours = simreg_terms(hidden, labels, mask, temperature, chunk_size, block_size=block_size)
    ref = reference_terms(hidden, labels, mask, temperature, chunk_size)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours[mask], ref[mask], rtol=1e-10, atol=1e-10)
    assert ref[mask].abs().min() < 20, "the data should exercise values of order one"


@pytest.mark.parametrize("block_size", [4, WHOLE], ids=["tiles", "whole"])
@pytest.mark.parametrize("reduction", ["group", "token"])
@pytest.mark.parametrize("chunk_size", [None, 6])
@pytest.mark.parametrize("temperature", [0.01, 1.0])
def test_loss_and_gradient_match_reference(reduction, chunk_size, temperature, block_size):
    hidden, labels = clustered(2, 18, 12)
    mask = random_mask(2, 18)
    ours = simreg_loss(hidden, labels, mask, temperature, chunk_size, reduction, block_size=block_size).loss
    ref = reference_loss(hidden, labels, mask, temperature, chunk_size, reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    assert ref > 1e-3
    fast, slow = both_gradients(
        lambda x: simreg_loss(x, labels, mask, temperature, chunk_size, reduction, block_size=block_size).loss,
        lambda x: reference_loss(x, labels, mask, temperature, chunk_size, reduction),
        hidden,
    )
    torch.testing.assert_close(fast, slow, rtol=1e-8, atol=1e-12)


def test_group_and_token_reductions_differ_when_groups_are_uneven():
    hidden, _ = clustered(1, 12, 8)
    labels = torch.tensor([[0] * 9 + [1, 2, 3]])
    group = simreg_loss(hidden, labels, temperature=0.1, reduction="group").loss
    token = simreg_loss(hidden, labels, temperature=0.1, reduction="token").loss
    torch.testing.assert_close(group, reference_loss(hidden, labels, temperature=0.1, reduction="group"))
    torch.testing.assert_close(token, reference_loss(hidden, labels, temperature=0.1, reduction="token"))
    assert not torch.isclose(group, token)


def test_bf16_input_computes_in_fp32():
    hidden, labels = clustered(2, 32, 64, dtype=torch.bfloat16)
    mask = random_mask(2, 32)
    ours = simreg_terms(hidden, labels, mask, 0.01)
    assert ours.dtype == torch.float32
    ref = reference_terms(hidden.double(), labels, mask, 0.01)  # the same bf16 values, exact in both
    torch.testing.assert_close(ours[mask].double(), ref[mask], rtol=1e-4, atol=1e-3)  # fp32 logits: ~4e-4 at h = 64
    x = hidden.detach().clone().requires_grad_()
    simreg_loss(x, labels, mask, 0.01).loss.backward()
    assert x.grad.dtype == torch.bfloat16
    reference_input = hidden.double().requires_grad_()
    reference_loss(reference_input, labels, mask, 0.01).backward()
    slow = reference_input.grad
    # the gradient is rounded to bf16 on the way out (2^-8 relative) on top of the fp32 logits' error
    torch.testing.assert_close(x.grad.double(), slow, rtol=2e-2, atol=1e-4 * slow.abs().max().item())


@pytest.mark.parametrize("block_size", [3, WHOLE], ids=["tiles", "whole"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_gradcheck_float64(chunk_size, block_size):
    hidden, labels = clustered(1, 10, 6, labels=3)
    mask = random_mask(1, 10, keep=0.9)
    x = hidden.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: simreg_loss(x, labels, mask, 0.1, chunk_size, block_size=block_size).loss, (x,), eps=1e-6, atol=1e-7
    )
    assert torch.autograd.gradcheck(
        lambda x: simreg_terms(x, labels, mask, 0.1, chunk_size, block_size=block_size), (x,), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("block_size", [3, WHOLE], ids=["tiles", "whole"])
def test_gradcheck_float64_short_chunks_sharing_a_tile(block_size):
    hidden, labels = clustered(2, 10, 6, labels=3)
    x = hidden.requires_grad_()
    assert torch.autograd.gradcheck(  # chunks of 2 in 3 x 3 tiles: two chunks per tile, the last one alone
        lambda x: simreg_loss(x, labels, random_mask(2, 10, keep=0.9), 0.1, 2, block_size=block_size).loss,
        (x,), eps=1e-6, atol=1e-7,
    )


def test_blockwise_equals_single_tile():
    hidden, labels = clustered(2, 40, 16, dtype=torch.float32)
    mask = random_mask(2, 40)
    tiled, whole = both_gradients(
        lambda x: simreg_loss(x, labels, mask, 0.01, block_size=3).loss,
        lambda x: simreg_loss(x, labels, mask, 0.01, block_size=WHOLE).loss,
        hidden,
    )
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-7)  # fp32 log-sum-exps merged in another order


@pytest.mark.parametrize(
    "b, s, chunk_size, block_size, whole",
    [(2, 16, None, 32, True), (2, 24, None, 32, False), (2, 24, 8, 32, True), (2, 24, 8, 16, False)],
)
def test_whole_matrix_kernel_runs_exactly_when_all_pairs_fit_one_tile(b, s, chunk_size, block_size, whole):
    """batch * segment^2 <= block^2 (2 x 16^2 = 512 <= 32^2; 2 x 24^2 = 1152 > 32^2; 6 chunks x 8^2 = 384)."""
    hidden, labels = clustered(b, s, 8, dtype=torch.float32)
    x = hidden.clone().requires_grad_()
    with mock.patch.object(simreg_dense._Tokens, "of", wraps=simreg_dense._Tokens.of) as spy:
        simreg_loss(x, labels, random_mask(b, s), 0.01, chunk_size, block_size=block_size).loss.backward()
    assert spy.called == whole


def test_sequence_first_input_is_used_in_place():
    hidden, labels = clustered(3, 16, 8, dtype=torch.float32)
    mask = random_mask(3, 16)
    sequence_first = hidden.transpose(0, 1).contiguous().requires_grad_()  # Megatron's [s, b, h]
    batch_first = hidden.clone().requires_grad_()
    a = simreg_loss(sequence_first, labels, mask, 0.1, sequence_first=True).loss
    b = simreg_loss(batch_first, labels, mask, 0.1).loss
    torch.testing.assert_close(a, b)
    (a + b).backward()
    assert sequence_first.grad.is_contiguous()  # the gradient comes back in the caller's layout
    torch.testing.assert_close(sequence_first.grad.transpose(0, 1), batch_first.grad)


@pytest.mark.parametrize(
    "case",
    ["all same label", "all masked", "zero vectors", "duplicates", "single valid token"],
)
@pytest.mark.parametrize("block_size", [5, WHOLE], ids=["tiles", "whole"])
def test_edge_cases_are_finite(case, block_size):
    hidden, labels = clustered(2, 12, 8, dtype=torch.float32)
    mask = torch.ones(2, 12, dtype=torch.bool)
    if case == "all same label":
        labels = torch.zeros_like(labels)
    elif case == "all masked":
        mask[0] = False
    elif case == "zero vectors":
        hidden[0, :4] = 0
    elif case == "duplicates":
        hidden[:, 6:] = hidden[:, :6]
    elif case == "single valid token":
        mask[:] = False
        mask[1, 3] = True
    x = hidden.clone().requires_grad_()
    out = simreg_loss(x, labels, mask, 0.01, block_size=block_size)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    for value in (out.lsr_mean, out.live_fraction, out.negative_angle):
        assert torch.isfinite(value)
    ref = reference_loss(hidden.double(), labels, mask, 0.01)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-4, atol=1e-6)  # fp32 logits at tau = 0.01
    if case == "all same label":  # no negatives anywhere: Lsr = -inf, no loss, no gradient
        assert out.loss == 0 and torch.all(x.grad == 0)
        assert torch.isinf(simreg_terms(hidden, labels, mask, block_size=block_size)).all()


@pytest.mark.parametrize("block_size", [6, WHOLE], ids=["tiles", "whole"])
def test_statistics(block_size):
    hidden, labels = clustered(2, 20, 8)
    mask = random_mask(2, 20)
    out = simreg_loss(hidden, labels, mask, 0.1, live_threshold=0.05, block_size=block_size)
    ref = reference_terms(hidden, labels, mask, 0.1)[mask]
    finite = ref[torch.isfinite(ref)]
    torch.testing.assert_close(out.lsr_mean, finite.mean())
    torch.testing.assert_close(out.live_fraction.double(), (torch.sigmoid(finite) >= 0.05).sum() / mask.sum().double())
    units = F.normalize(hidden, dim=-1)
    angles = []
    for sample in range(2):
        for i in range(20):
            for j in range(20):
                if mask[sample, i] and mask[sample, j] and labels[sample, i] != labels[sample, j]:
                    cosine = float(units[sample, i] @ units[sample, j])
                    angles.append(math.degrees(math.acos(min(1.0, max(-1.0, cosine)))))
    assert out.negative_angle.item() == pytest.approx(sum(angles) / len(angles), rel=1e-9)
    assert out.tokens.item() == mask.sum().item()
    assert set(out.stats()) == {"simreg", "simreg lsr", "simreg live anchors", "simreg negative angle"}


def saved_for_backward(loss_of, x) -> list[int]:
    """The sizes of the tensors the loss's graph saves for backward."""
    saved = []

    def keep(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = loss_of(x)
    loss.backward()
    return saved


def test_backward_keeps_no_quadratic_tensor():
    """Saved for backward by the tiles: the embeddings and per-token scalars, nothing of size s x s."""
    s, h = 256, 8
    hidden, labels = clustered(1, s, h, dtype=torch.float32)
    saved = saved_for_backward(lambda x: simreg_loss(x, labels, temperature=0.01, block_size=32).loss,
                               hidden.clone().requires_grad_())
    assert saved and max(saved) <= s * h


def test_whole_matrix_kernel_keeps_one_tile_for_backward():
    """The whole-matrix kernel keeps the logits and the label mask (batch * s^2 <= block^2 values each)."""
    s, h = 128, 8
    hidden, labels = clustered(1, s, h, dtype=torch.float32)
    saved = saved_for_backward(lambda x: simreg_loss(x, labels, temperature=0.01, block_size=s).loss,
                               hidden.clone().requires_grad_())
    assert sorted(n for n in saved if n > s * h) == [s * s, s * s]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(chunk_size=0), "chunk_size"),
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="mean"), "reduction"),
        (dict(sequence_layout="ring"), "sequence_layout"),
        (dict(live_threshold=0.0), "live_threshold"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    hidden, labels = clustered(1, 8, 4)
    with pytest.raises(ValueError, match=message):
        simreg_loss(hidden, labels, **kwargs)


def test_label_shape_mismatch_is_explained():
    hidden, labels = clustered(2, 8, 4)
    with pytest.raises(ValueError, match="labels"):
        simreg_loss(hidden, labels[:, :4])


@pytest.mark.parametrize("block_size", [4, WHOLE], ids=["tiles", "whole"])
@pytest.mark.parametrize("reduction", ["group", "token"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_batch_value_is_a_sum_over_sequences_whatever_the_split(reduction, chunk_size, block_size):
    """Cutting a batch into micro-batches (or data-parallel ranks) adds up to the same objective:
    token_weighted_sum is a sum of per-sequence terms, and loss the token-weighted mean over sequences."""
    hidden, labels = clustered(4, 16, 8, dtype=torch.float64)
    mask = random_mask(4, 16)
    mask[3, 5:] = 0  # sequences of unequal length
    x = hidden.clone().requires_grad_()
    whole = simreg_loss(x, labels, mask, 0.1, chunk_size, reduction, block_size=block_size)
    whole.token_weighted_sum.backward()
    y = hidden.clone().requires_grad_()
    parts = [simreg_loss(y[i:i + 2], labels[i:i + 2], mask[i:i + 2], 0.1, chunk_size, reduction, block_size=block_size)
             for i in (0, 2)]
    sum(p.token_weighted_sum for p in parts).backward()
    torch.testing.assert_close(whole.token_weighted_sum, sum(p.token_weighted_sum for p in parts))
    torch.testing.assert_close(whole.loss, sum(p.loss * p.tokens for p in parts) / mask.sum().double())
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(whole.loss, reference_loss(hidden, labels, mask, 0.1, chunk_size, reduction))


@pytest.mark.parametrize("block_size", [5, WHOLE], ids=["tiles", "whole"])
@pytest.mark.parametrize("offset", [2**40, 2**24 - 3, -7])
def test_labels_float32_cannot_tell_apart_still_pair_exactly(offset, block_size):
    """Labels enter the tiles as float32 numbers: ids from 2^24 on (2^24 and 2^24 + 1 are the same float32)
    and negative ones (an ignore index under a mask) must still pair exactly as the integers do."""
    hidden, labels = clustered(2, 16, 8, dtype=torch.float32)  # float32: the tiles' labels are float32 too
    mask = random_mask(2, 16)
    shifted = labels + offset
    ours = simreg_loss(hidden, shifted, mask, 0.1, block_size=block_size)
    ref = reference_loss(hidden.double(), shifted, mask, 0.1)
    # fp32 cosines of 8-dimensional units are within ~8 * 2^-24 = 5e-7, x 1/tau = 10: ~5e-6 on the logits.
    torch.testing.assert_close(ours.loss.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(simreg_terms(hidden, shifted, mask, 0.1, block_size=block_size)[mask].double(),
                               reference_terms(hidden.double(), shifted, mask, 0.1)[mask], rtol=1e-5, atol=1e-5)


class _OnGpu(torch.Tensor):
    """CPU tensors that say they are CUDA tensors, so `kernel: auto` looks for Triton as it does on a GPU."""

    is_cuda = True


@pytest.fixture
def old_triton(monkeypatch):
    """Triton 3.1 as older images ship it: it imports, but has no `triton.knobs` (Triton >= 3.4), which the
    kernel module reads at import; only this test sees it, and the kernel module is imported afresh."""
    import sys
    import types

    from megatron_simreg import simreg

    triton = types.ModuleType("triton")
    triton.__version__, triton.language = "3.1.0", types.ModuleType("triton.language")
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.language", triton.language)
    monkeypatch.delitem(sys.modules, "megatron_simreg.simreg.triton", raising=False)
    monkeypatch.delitem(sys.modules, "megatron_simreg.simreg.triton_jit", raising=False)
    monkeypatch.delattr(simreg, "triton", raising=False)
    simreg._triton.cache_clear()
    simreg._say_once.cache_clear()
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:  # imported under the stand-in: gone, so no later test sees it
        if name.startswith("megatron_simreg."):
            del sys.modules[name]
    simreg._triton.cache_clear()


def test_auto_kernel_falls_back_to_pytorch_on_an_old_triton_in_one_line(old_triton, capsys):
    hidden, labels = clustered(2, 12, 16, dtype=torch.float32)
    expected = simreg_loss(hidden, labels, kernel="torch").loss
    for _ in range(2):
        on_gpu = torch.Tensor._make_subclass(_OnGpu, hidden)
        assert simreg_loss(on_gpu, labels, kernel="auto").loss.item() == expected.item()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["simreg: the Triton kernel cannot run here (triton >= 3.4 needed (triton.knobs), found 3.1.0); "
                     "using the PyTorch kernel"]
    with pytest.raises(ValueError, match=r"^simreg.kernel=triton: triton >= 3.4 needed \(triton.knobs\), found 3.1.0; "
                                         r"set simreg.kernel=torch or auto$"):
        simreg_loss(torch.Tensor._make_subclass(_OnGpu, hidden), labels, kernel="triton")


def test_triton_kernel_without_triton_names_the_missing_package(old_triton, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed
    hidden, labels = clustered(2, 12, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^simreg.kernel=triton: the triton package is not installed; set simreg"):
        simreg_loss(torch.Tensor._make_subclass(_OnGpu, hidden), labels, kernel="triton")
