"""The baseline regularizers against naive float64 references: values and gradients with masks, chunks and
small tiles, empty pair sets, gradcheck of the tiled reductions, dropout views, config errors."""

import dataclasses

import pytest
import regularizer_reference as ref
import torch
from test_simreg import clustered, random_mask

from megatron_simreg import regularizers
from megatron_simreg.regularizers import RegularizerInputs
from megatron_simreg.regularizers.cpretrain import CPretrainState
from megatron_simreg.regularizers.pairing import pairs_for
from megatron_simreg.regularizers.pairwise import pair_logsumexp, pair_softmax_average, pair_softplus_sums
from megatron_simreg.regularizers.sce import SCEState

B, S, H, V = 2, 12, 8, 11


@pytest.fixture(scope="module")
def data():
    hidden, labels = clustered(B, S, H, labels=4, spread=0.5)
    second, _ = clustered(B, S, H, labels=4, spread=0.5, seed=3)
    gen = torch.Generator().manual_seed(5)
    return dict(hidden=hidden, second=0.5 * hidden + second, labels=labels % V, mask=random_mask(B, S, keep=0.75),
                table=torch.randn(V, H, generator=gen, dtype=torch.float64),
                target=torch.randn(B, S, H, generator=gen, dtype=torch.float64) * 3)


def seq_first(x):
    return x.transpose(0, 1)


def inputs_for(d, hidden, second=None, table=None, target=None, training=True):
    return RegularizerInputs(
        hidden=seq_first(hidden), labels=d["labels"], loss_mask=d["mask"].double(),
        second_view=None if second is None else seq_first(second),
        label_embeddings=None if table is None else (lambda: seq_first(table[d["labels"]])),
        logits=None if table is None else (lambda x: x @ table.T),
        target_view=None if target is None else seq_first(target), training=training,
    )


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def assert_same_value_and_gradients(ours, theirs, tensors, rtol=1e-9):
    """`ours(*leaves)` and `theirs(*leaves)`: equal values, equal gradients for every leaf."""
    a, b = leaves(*tensors), leaves(*tensors)
    value_a, value_b = ours(*a), theirs(*b)
    torch.testing.assert_close(value_a, value_b, rtol=rtol, atol=1e-12)
    assert value_b.abs() > 1e-3, "the data should give the term a size"
    value_a.backward()
    value_b.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-8, atol=1e-11)


CHUNKS = [("full", None), ("chunk", 5), ("chunk", 4)]  # 5: the last chunk is short; 4: small tiles hold 2 chunks


@pytest.mark.parametrize("mode, chunk", CHUNKS)
def test_simcse_matches_reference(data, mode, chunk):
    settings = regularizers.SimCSESettings(mode=mode, chunk_size=chunk, views="forward", block_size=4)
    assert_same_value_and_gradients(
        lambda h, h2: regularizers.simcse_loss(inputs_for(data, h, h2), settings).loss,
        lambda h, h2: ref.simcse(h, h2, data["mask"], 0.05, chunk),
        [data["hidden"], data["second"]],
    )


@pytest.mark.parametrize("mode, chunk", CHUNKS)
def test_cpretrain_matches_reference_with_its_temperature(data, mode, chunk):
    settings = regularizers.CPretrainSettings(mode=mode, chunk_size=chunk, init_temperature=0.2, block_size=4)
    state = CPretrainState(settings, torch.float64)

    def ours(h, table, log_scale):
        del state.log_scale  # the leaf under test stands in for the parameter
        state.log_scale = log_scale.view(1)
        return regularizers.cpretrain_loss(inputs_for(data, h, table=table), settings, state).loss

    def theirs(h, table, log_scale):
        return ref.cpretrain(h, table[data["labels"]], data["labels"], data["mask"], log_scale.exp(), chunk)

    start = torch.tensor(ref.log_scale(0.2), dtype=torch.float64)
    assert_same_value_and_gradients(ours, theirs, [data["hidden"], data["table"], start])


@pytest.mark.parametrize("mode, chunk", CHUNKS)
def test_creg_matches_reference(data, mode, chunk):
    settings = regularizers.CRegSettings(mode=mode, chunk_size=chunk, views="forward", consistency_weight=0.7,
                                         block_size=4)
    assert_same_value_and_gradients(
        lambda h, h2, w: regularizers.creg_loss(inputs_for(data, h, h2, table=w), settings).loss,
        lambda h, h2, w: ref.creg_contrastive(h, data["labels"], data["mask"], 0.1, chunk)
        + 0.7 * ref.jensen_shannon(h @ w.T, h2 @ w.T, data["mask"]),
        [data["hidden"], data["second"], data["table"]],
    )


@pytest.mark.parametrize("mode, chunk", CHUNKS)
@pytest.mark.parametrize("target", ["view", "ema"])
def test_sce_matches_reference(data, mode, chunk, target):
    """The original's tau and tau_m by default; the target is the momentum encoder's states (ema) or the
    cross-entropy pass's (view), detached either way."""
    settings = regularizers.SCESettings(mode=mode, chunk_size=chunk, views="forward", target=target, target_dropout=0.0,
                                        block_size=4)
    assert (settings.temperature, settings.target_temperature, settings.momentum) == (0.1, 0.07, 0.99)

    def theirs(h, h2):
        return ref.sce(h2, data["target"] if target == "ema" else h, data["mask"], 0.1, 0.07, 0.5, chunk)

    assert_same_value_and_gradients(
        lambda h, h2: regularizers.sce_loss(inputs_for(data, h, h2, target=data["target"]), settings).loss,
        theirs, [data["hidden"], data["second"]],
    )


def test_sce_momentum_encoder_is_an_fp32_ema_of_every_weight():
    """Starts as a copy of the model, stays fp32 when the model is cast to bf16, and after each update equals
    the float64 EMA of the weights it was handed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.RMSNorm(3))
    settings = regularizers.SCESettings(momentum=0.9)
    model.regularizer_state = SCEState(settings, model, torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.RMSNorm(3)))
    encoder = model.regularizer_state.encoder
    model.bfloat16()
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in encoder.parameters())
    expected = {name: p.detach().double() for name, p in model[:2].named_parameters()}
    for name, p in encoder.named_parameters():
        assert torch.equal(p.double(), expected[name])
    for step in range(3):
        with torch.no_grad():
            for p in model[:2].parameters():
                p.add_(torch.randn(p.shape).to(p.dtype))
        model.regularizer_state.update(model)
        for name, p in model[:2].named_parameters():
            expected[name] = ref.ema(expected[name], p.detach().double(), 0.9)
    for name, p in encoder.named_parameters():
        torch.testing.assert_close(p.double(), expected[name], rtol=1e-6, atol=1e-7)  # fp32 rounding, 3 steps


def test_dropout_views_are_two_independent_masks(data):
    """With views "dropout" SimCSE compares two dropout draws of the final states; seeded alike, the reference
    on the same two draws gives the same value."""
    hidden = data["hidden"]
    settings = regularizers.SimCSESettings(dropout=0.3, views="dropout")
    torch.manual_seed(7)
    ours = regularizers.simcse_loss(inputs_for(data, hidden), settings).loss
    torch.manual_seed(7)
    a, b = (seq_first(torch.nn.functional.dropout(seq_first(hidden), 0.3, training=True)) for _ in range(2))
    torch.testing.assert_close(ours, ref.simcse(a, b, data["mask"], 0.05), rtol=1e-9, atol=0)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name, settings", [
    ("simcse", regularizers.SimCSESettings(dropout=0.3, views="dropout")),
    ("sce", regularizers.SCESettings(dropout=0.3, target="view")),
])
def test_evaluation_drops_nothing_out(data, name, settings):
    """In evaluation the views are the final states themselves: the value is the reference's on them, on every
    call (validation values are deterministic)."""
    loss = getattr(regularizers, f"{name}_loss")
    values = [loss(inputs_for(data, data["hidden"], training=False), settings).loss for _ in range(2)]
    h = data["hidden"]
    want = (ref.simcse(h, h, data["mask"], 0.05) if name == "simcse"
            else ref.sce(h, h, data["mask"], 0.1, 0.07, 0.5))
    assert torch.equal(values[0], values[1])
    torch.testing.assert_close(values[0], want, rtol=1e-9, atol=0)


def test_empty_pair_sets_give_zero_and_no_nan():
    """One valid token, or one label for all: no negatives; a fully masked sequence: nothing."""
    hidden, _ = clustered(2, 6, 8)
    labels = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6)
    mask[0, 2] = 1  # sample 0: a single valid token; sample 1: nothing valid
    table = torch.randn(3, 8, dtype=torch.float64)
    leaf = hidden.clone().requires_grad_()
    inputs = RegularizerInputs(seq_first(leaf), labels, mask, label_embeddings=lambda: seq_first(table[labels]),
                               second_view=seq_first(leaf * 1.1), target_view=seq_first(hidden * 0.9),
                               logits=lambda x: x @ table.T)
    outputs = {
        "simcse": regularizers.simcse_loss(inputs, regularizers.SimCSESettings(views="forward")),
        "cpretrain": regularizers.cpretrain_loss(inputs, regularizers.CPretrainSettings(learnable=False), None),
        "creg": regularizers.creg_loss(inputs, regularizers.CRegSettings(views="forward")),
        "sce": regularizers.sce_loss(inputs, regularizers.SCESettings(views="forward", target_dropout=0.0), None),
    }
    for name, out in outputs.items():
        assert out.tokens.item() == 1, name
        out.loss.backward(retain_graph=True)
        assert torch.isfinite(leaf.grad).all(), name
        if name != "creg":  # CReg's consistency term does not pair tokens
            assert out.loss.abs().item() < 1e-12, name
        leaf.grad = None
    # all valid, one label: CPretrain has no negatives at all; CReg has only positive pairs
    inputs = dataclasses.replace(inputs, loss_mask=None)
    assert regularizers.cpretrain_loss(inputs, regularizers.CPretrainSettings(learnable=False), None).loss.item() == 0.0
    creg = regularizers.creg_loss(inputs, regularizers.CRegSettings(consistency_weight=0.0))
    torch.testing.assert_close(creg.loss, ref.creg_contrastive(hidden, labels, torch.ones(2, 6, dtype=torch.bool), 0.1))


def test_tiled_reductions_pass_gradcheck():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, dtype=torch.float64, generator=gen).requires_grad_()
    k = torch.randn(2, 7, 4, dtype=torch.float64, generator=gen).requires_grad_()
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 7), generator=gen)
    pairs = pairs_for(labels, random_mask(2, 7, keep=0.8), 3, None)  # chunks of 3: rows [6, 3]
    for kind in ("all", "other_label", "not_self"):
        def row_sums(a, c, t):
            lse = pair_logsumexp(pairs.rows(a), pairs.keys(c), t, pairs, kind, block_size=2)
            return torch.where(torch.isfinite(lse), lse, 0.0).sum()

        assert torch.autograd.gradcheck(row_sums, (q, k, scale), fast_mode=True), kind

    def softplus_sums(a, c):
        positive, negative, _, _ = pair_softplus_sums(pairs.rows(a), pairs.keys(c), 1.3, 0.2, pairs, block_size=2)
        return positive.sum() + 2 * negative.sum()

    assert torch.autograd.gradcheck(softplus_sums, (q, k), fast_mode=True)


def test_softmax_average_matches_a_dense_softmax():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 9, 4, dtype=torch.float64, generator=gen)
    labels = torch.zeros(1, 9, dtype=torch.long)
    pairs = pairs_for(labels, torch.ones(1, 9, dtype=torch.bool), None, None)
    average, lse = pair_softmax_average(q, q, q, 2.0, pairs, "not_self", block_size=4)
    logits = (q[0] @ q[0].T) * 2.0
    logits.fill_diagonal_(float("-inf"))
    torch.testing.assert_close(average[0], torch.softmax(logits, -1) @ q[0])
    torch.testing.assert_close(lse[0], torch.logsumexp(logits, -1))


@pytest.mark.parametrize("name", ["simcse", "cpretrain", "creg", "sce"])
def test_regularizer_gradcheck(data, name):
    """Each regularizer end to end, float64, small, deterministic views (SCE's target view is a constant: it
    gets no gradient by design)."""
    entry = regularizers.get(name)
    views = {"views": "forward"} if name != "cpretrain" else {}
    target = {"target_dropout": 0.0, "target": "view"} if name == "sce" else {}
    settings = entry.settings(mode="chunk", chunk_size=5, block_size=3, **views, **target)
    state = CPretrainState(settings, torch.float64) if name == "cpretrain" else None
    h, h2, table = leaves(data["hidden"][:1, :8], data["second"][:1, :8], data["table"])
    labels, mask = data["labels"][:1, :8], data["mask"][:1, :8]
    if name == "sce":
        h.requires_grad_(False)

    def value(h, h2, table):
        inputs = RegularizerInputs(seq_first(h), labels, mask.double(), second_view=seq_first(h2),
                                   label_embeddings=lambda: seq_first(table[labels]), logits=lambda x: x @ table.T)
        return entry.compute(inputs, settings, state).loss

    assert torch.autograd.gradcheck(value, (h, h2, table), fast_mode=True)


def test_bf16_hidden_states_compute_in_fp32(data):
    hidden = data["hidden"].to(torch.bfloat16)
    inputs = RegularizerInputs(seq_first(hidden), data["labels"], second_view=seq_first(hidden))
    out = regularizers.simcse_loss(inputs, regularizers.SimCSESettings(views="forward"))
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ref.simcse(hidden.double(), hidden.double(), torch.ones(B, S), 0.05),
                               rtol=1e-5, atol=0)  # bf16 inputs are exact in fp64; fp32 sums of ~14 terms: ~1e-6
