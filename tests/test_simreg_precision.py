"""SimReg's PyTorch kernel and torch's process-wide settings: it multiplies in IEEE float32 whatever the
setting (TF32 on NGC images, oneDNN's bf16 on some CPUs), runs its elementwise passes on one thread, and
leaves both settings as it found them, exceptions included."""

import math

import pytest
import torch
from test_simreg import clustered
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_simreg.simreg import simreg_loss
from megatron_simreg.simreg import tiles as simreg_module
from megatron_simreg.simreg.base import NEGLIGIBLE_WEIGHT


class PrecisionRecorder(TorchDispatchMode):
    """Records the float32 product precision in force at every matrix product."""

    def __init__(self, fail_at_first_product=False):
        super().__init__()
        self.seen, self.fail = [], fail_at_first_product

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith(("bmm", "baddbmm", "mm", "addmm")):
            self.seen.append(current_precision())
            if self.fail:
                raise RuntimeError("injected failure")
        return func(*args, **(kwargs or {}))


def current_precision():
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision


@pytest.fixture
def reduced_precision_products():
    """The process set up as NGC images set it (TF32 for float32 products), with oneDNN's bf16 products too."""
    saved = current_precision()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    yield current_precision()
    torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = saved


def test_products_are_ieee_and_the_setting_is_restored(reduced_precision_products):
    hidden, labels = clustered(1, 24, 8, dtype=torch.float32)
    x = hidden.clone().requires_grad_()
    with PrecisionRecorder() as recorder:
        out = simreg_loss(x, labels, temperature=0.01, block_size=8, kernel="torch")
        out.loss.backward()
    assert recorder.seen and set(recorder.seen) == {("ieee", "ieee")}
    assert current_precision() == reduced_precision_products

    torch.backends.cuda.matmul.fp32_precision = torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    y = hidden.clone().requires_grad_()
    again = simreg_loss(y, labels, temperature=0.01, block_size=8, kernel="torch")
    again.loss.backward()
    assert torch.equal(out.loss, again.loss) and torch.equal(x.grad, y.grad)


def test_setting_is_restored_after_an_exception(reduced_precision_products):
    hidden, labels = clustered(1, 24, 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="injected"), PrecisionRecorder(fail_at_first_product=True):
        simreg_loss(hidden, labels, block_size=8, kernel="torch")
    assert current_precision() == reduced_precision_products


class ThreadRecorder(TorchDispatchMode):
    """Records torch's thread count at every matrix product, and at every elementwise pass over a strip
    (a `[segments, block, keys]` tensor, block = 8 here)."""

    def __init__(self):
        super().__init__()
        self.products, self.elementwise = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name.startswith(("bmm", "baddbmm")):
            self.products.add(torch.get_num_threads())
        elif name.startswith(("exp", "clamp_min", "addcmul")) and args[0].dim() == 3 and args[0].shape[1] == 8:
            self.elementwise.add(torch.get_num_threads())
        return func(*args, **(kwargs or {}))


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_strip_passes_run_on_one_thread_and_the_thread_count_is_restored(two_threads, monkeypatch):
    """Products use torch's threads, the strips' elementwise passes one (no barrier per pass), and the count
    comes back as it was, after an exception too; strips too small to gain leave the count as it is."""
    hidden, labels = clustered(1, 24, 8, dtype=torch.float32)
    for threshold, elementwise_threads in ((1, {1}), (8 * 8 * 8 + 1, {2})):  # a 8 x 8 tile of 8-wide units
        monkeypatch.setattr(simreg_module, "THREADED_PRODUCT_MACS", threshold)
        x = hidden.clone().requires_grad_()
        with ThreadRecorder() as recorder:
            simreg_loss(x, labels, block_size=8, kernel="torch").loss.backward()
        assert recorder.products == {2} and recorder.elementwise == elementwise_threads
    monkeypatch.setattr(simreg_module, "THREADED_PRODUCT_MACS", 1)
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="injected"), PrecisionRecorder(fail_at_first_product=True):
        simreg_loss(hidden, labels, block_size=8, kernel="torch")
    assert torch.get_num_threads() == 2


class ProductInputRecorder(TorchDispatchMode):
    """The smallest nonzero magnitude among the pair weights (first operand) of backward's `baddbmm`s."""

    def __init__(self):
        super().__init__()
        self.smallest = math.inf

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("baddbmm"):
            weights = args[1].abs()
            if bool((weights > 0).any()):
                self.smallest = min(self.smallest, float(weights[weights > 0].min()))
        return func(*args, **(kwargs or {}))


def test_floored_pair_weights_never_reach_a_product():
    """Random embeddings at h = 256 saturate every anchor (Lsr ~ -90, gradient weight ~1e-40): their pair weights
    sit at the exp floor, e^-80, and times a small unit component that is a subnormal product, which doubled the
    products' time on x86. They must reach the products as exact zeros; the live anchors' weights stay as they are."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 64, 256, requires_grad=True)
    live, live_labels = clustered(1, 64, 256, dtype=torch.float32)
    for x, labels, live_fraction in ((hidden, torch.randint(0, 1000, (1, 64)), 0.0), (live, live_labels, None)):
        x = x.detach().requires_grad_()
        out = simreg_loss(x, labels, block_size=16, kernel="torch")
        with ProductInputRecorder() as recorder:
            out.loss.backward()
        assert live_fraction is None or float(out.live_fraction) == live_fraction
        assert recorder.smallest > NEGLIGIBLE_WEIGHT
        assert torch.isfinite(x.grad).all()
