"""The fused Triton SimReg kernel, run on CPU by Triton's interpreter, against the naive float64 reference and
against the PyTorch kernel.

Triton decides at import whether its kernels run in the interpreter (TRITON_INTERPRET=1), and megatron-core
imports it in this process: the cases run in one fresh process started with that variable, which nothing
else sees. Tolerances: both kernels compute in float32. A logit z = cos / tau carries the rounding of a
float32 dot product of unit vectors (~sqrt(h) * 2^-24 relative, on values up to 1/tau); Lsr and its
log-sum-exps inherit that absolute error, the loss and gradients a relative error of that order. Shapes stay
small: the interpreter runs every program of the grid one after the other in numpy.
"""

import contextlib
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from simreg_reference import reference_loss, reference_terms
from test_simreg import clustered, random_mask

from megatron_simreg.simreg import simreg_loss, simreg_terms

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interpreter():
    """A process whose Triton kernels run in the interpreter, on CPU tensors: `interpreter(case, *args)`."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        executor.submit(os.getpid).result()  # started now, while the variable is set
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    with executor:
        yield lambda case, *args: executor.submit(case, *args).result()


def interpreted():
    from megatron_simreg.simreg import triton as simreg_triton

    assert simreg_triton.INTERPRETED, "the case must run in the interpreter's process"


def logit_tolerance(h, temperature, dtype=torch.float32):
    """Absolute error of a logit computed in `dtype`: ~sqrt(h) roundings of a cosine (x16 margin), over tau."""
    return 16 * math.sqrt(h) * torch.finfo(dtype).eps / temperature


def gradients(fn, hidden):
    x = hidden.detach().clone().requires_grad_()
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


TERMS_CASES = [
    (None, 0.01, 37, 16),  # 3 x 3 tiles, the last block 5 tokens long
    (None, 0.1, 24, 16),
    (10, 0.05, 37, 16),  # 4 chunks, the last one 7 tokens long
    (3, 0.05, 20, 5),  # chunks shorter than the smallest tile
]


def terms_case(chunk_size, temperature, s, block_size):
    interpreted()
    hidden, labels = clustered(2, s, 24, spread=0.3 if temperature == 0.01 else 1.0, dtype=torch.float32)
    mask = random_mask(2, s)
    fused = simreg_terms(hidden, labels, mask, temperature, chunk_size, block_size=block_size, kernel="triton")
    tiled = simreg_terms(hidden, labels, mask, temperature, chunk_size, block_size=block_size, kernel="torch")
    ref = reference_terms(hidden.double(), labels, mask, temperature, chunk_size)
    assert fused.dtype == torch.float32 and torch.equal(fused[~mask], torch.zeros_like(fused[~mask]))
    assert torch.equal(torch.isinf(fused), torch.isinf(ref))
    finite = mask & torch.isfinite(ref)
    tolerance = logit_tolerance(24, temperature)
    torch.testing.assert_close(fused[finite].double(), ref[finite], rtol=0, atol=tolerance)
    torch.testing.assert_close(fused[finite], tiled[finite], rtol=0, atol=tolerance)
    assert ref[finite].abs().min() < 20, "the data should exercise values of order one"


@pytest.mark.parametrize("chunk_size, temperature, s, block_size", TERMS_CASES)
def test_terms_match_reference_and_torch(interpreter, chunk_size, temperature, s, block_size):
    interpreter(terms_case, chunk_size, temperature, s, block_size)


def loss_case(reduction, chunk_size):
    interpreted()
    hidden, labels = clustered(2, 30, 16, dtype=torch.float32)
    mask = random_mask(2, 30)
    kwargs = dict(temperature=0.05, chunk_size=chunk_size, reduction=reduction, block_size=16)
    fused, fused_grad = gradients(lambda x: simreg_loss(x, labels, mask, kernel="triton", **kwargs).loss, hidden)
    tiled, tiled_grad = gradients(lambda x: simreg_loss(x, labels, mask, kernel="torch", **kwargs).loss, hidden)
    ref, ref_grad = gradients(lambda x: reference_loss(x, labels, mask, 0.05, chunk_size, reduction), hidden.double())
    assert ref > 1e-3
    tolerance = logit_tolerance(16, 0.05)  # relative: the loss and its gradient move with the logits' errors
    torch.testing.assert_close(fused.double(), ref, rtol=tolerance, atol=0)
    torch.testing.assert_close(fused, tiled, rtol=tolerance, atol=0)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(fused_grad.double(), ref_grad, rtol=0, atol=tolerance * scale)
    torch.testing.assert_close(fused_grad, tiled_grad, rtol=0, atol=tolerance * scale)


@pytest.mark.parametrize("reduction", ["group", "token"])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_loss_and_gradient_match_reference_and_torch(interpreter, reduction, chunk_size):
    interpreter(loss_case, reduction, chunk_size)


EDGE_CASES = ["no negatives", "all masked", "duplicated direction", "zero vectors", "far negatives"]


def edge_case(case):
    interpreted()
    hidden, labels = clustered(2, 20, 12, dtype=torch.float32)
    mask = torch.ones(2, 20, dtype=torch.bool)
    temperature = 0.01
    if case == "no negatives":  # every anchor of sample 0 has an empty N_i: Lsr = -inf, no loss, no gradient
        labels[0] = 3
    elif case == "all masked":
        mask[1] = False
    elif case == "duplicated direction":  # logits of different-label pairs reach the self term's 1/tau
        hidden[:, 10:] = hidden[:, :10]
    elif case == "zero vectors":  # |u| = 0: all their logits are 0, far below everyone's self term 1/tau
        hidden[0, :4] = 0
    elif case == "far negatives":  # near-orthogonal vectors: every negative lies ~100 below the self term
        hidden = torch.randn(2, 20, 512, generator=torch.Generator().manual_seed(3))
        labels = torch.arange(40).view(2, 20) % 17
    h = hidden.shape[-1]
    tolerance = logit_tolerance(h, temperature)
    ref = reference_terms(hidden.double(), labels, mask, temperature)
    finite = mask & torch.isfinite(ref)
    for kernel in ("triton", "torch"):
        terms = simreg_terms(hidden, labels, mask, temperature, block_size=16, kernel=kernel)
        assert torch.equal(torch.isinf(terms[mask]), torch.isinf(ref[mask])), (case, kernel)
        torch.testing.assert_close(terms[finite].double(), ref[finite], rtol=0, atol=tolerance, msg=f"{case} {kernel}")
    if case == "far negatives":
        assert ref[mask].max() < -60, "Lsr must be far below zero here, yet finite"

    def loss(kernel):
        return lambda x: simreg_loss(x, labels, mask, temperature, block_size=16, kernel=kernel).loss

    fused_loss, fused_grad = gradients(loss("triton"), hidden)
    tiled_loss, tiled_grad = gradients(loss("torch"), hidden)
    assert torch.isfinite(fused_grad).all()
    torch.testing.assert_close(fused_loss, tiled_loss, rtol=tolerance, atol=1e-30)
    scale = max(tiled_grad.abs().max().item(), 1e-30)
    torch.testing.assert_close(fused_grad, tiled_grad, rtol=0, atol=tolerance * scale)
    if case == "no negatives":
        assert torch.equal(fused_grad[0], torch.zeros_like(fused_grad[0]))
    if case == "all masked":
        assert torch.equal(fused_grad[1], torch.zeros_like(fused_grad[1]))


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_match_torch_and_reference(interpreter, case):
    interpreter(edge_case, case)


def bf16_case():
    interpreted()
    hidden, labels = clustered(2, 24, 32, dtype=torch.bfloat16)
    mask = random_mask(2, 24)
    sequence_first = hidden.transpose(0, 1).contiguous()
    terms = simreg_terms(sequence_first, labels, mask, 0.01, sequence_first=True, block_size=16, kernel="triton")
    ref = reference_terms(hidden.double(), labels, mask, 0.01)
    finite = mask & torch.isfinite(ref)
    torch.testing.assert_close(terms[finite].double(), ref[finite], rtol=0, atol=logit_tolerance(32, 0.01))

    x = sequence_first.clone().requires_grad_()
    simreg_loss(x, labels, mask, 0.01, sequence_first=True, block_size=16, kernel="triton").loss.backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.stride() == x.stride()
    _, ref_grad = gradients(lambda y: reference_loss(y, labels, mask, 0.01), hidden.double())
    # Backward multiplies the bf16 inputs by W rounded to bf16 (2^-8 relative) and stores the result in bf16.
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(x.grad.transpose(0, 1).double(), ref_grad, rtol=0, atol=4 * 2**-8 * scale)


def test_bf16_sequence_first_input_is_read_in_place(interpreter):
    """Megatron's bf16 `[s, b, h]` hidden states: products of the bf16 values themselves, accumulated in float32
    (so the reference is float64 on the same bf16 values); the gradient comes back in bf16, in that layout."""
    interpreter(bf16_case)


def statistics_case():
    interpreted()
    hidden, labels = clustered(2, 24, 16, dtype=torch.float32)
    mask = random_mask(2, 24)
    x = hidden.clone().requires_grad_()
    fused = simreg_loss(x, labels, mask, 0.05, block_size=16, kernel="triton")
    tiled = simreg_loss(hidden, labels, mask, 0.05, block_size=16, kernel="torch")
    # Angles are arccos of float32 cosines (a 2e-8 rad polynomial arccos in the kernel).
    torch.testing.assert_close(fused.negative_angle, tiled.negative_angle, rtol=1e-5, atol=0)
    torch.testing.assert_close(fused.lsr_mean, tiled.lsr_mean, rtol=logit_tolerance(16, 0.05), atol=0)
    assert torch.equal(fused.live_fraction, tiled.live_fraction)
    (x.sum() + 0.0 * fused.loss).backward()  # lambda = 0 changes no bit of the other gradients
    assert torch.equal(x.grad, torch.ones_like(x))


def test_statistics_and_lambda_zero(interpreter):
    interpreter(statistics_case)


def gathered_keys_worker(rank, world, hidden, labels, mask, deterministic):
    """Full SimReg over two ranks (a gathered key sequence) with the Triton kernel."""
    interpreted()
    size = hidden.shape[1] // world
    mine = slice(rank * size, (rank + 1) * size)
    local = hidden[:, mine].transpose(0, 1).contiguous().requires_grad_()
    out = simreg_loss(
        local, labels[:, mine], mask[:, mine], 0.05, sequence_first=True, process_group=dist.group.WORLD,
        block_size=16, kernel="triton", deterministic=deterministic,
    )
    out.loss.backward()
    return out.loss.detach(), local.grad.transpose(0, 1)


def gathered_keys_case():
    interpreted()
    hidden, labels = clustered(2, 24, 8, labels=4, dtype=torch.float32)
    mask = random_mask(2, 24, keep=0.85)
    loss, grad = gradients(lambda x: simreg_loss(x, labels, mask, 0.05, block_size=16, kernel="torch").loss, hidden)
    tolerance = logit_tolerance(8, 0.05)
    for deterministic in (False, True):
        per_rank = run_distributed(gathered_keys_worker, 2, hidden, labels, mask, deterministic)
        for rank_loss, _ in per_rank:
            torch.testing.assert_close(rank_loss, loss, rtol=tolerance, atol=0)
        gathered = torch.cat([rank_grad for _, rank_grad in per_rank], dim=1)
        torch.testing.assert_close(gathered, grad, rtol=0, atol=tolerance * grad.abs().max().item())


def test_gathered_keys_equal_one_process(interpreter):
    """Full SimReg under sequence parallelism: local anchors against the gathered sequence, as one process, with
    either backward."""
    interpreter(gathered_keys_case)


def deterministic_case():
    interpreted()
    from triton.runtime.interpreter import interpreter_builder

    hidden, labels = clustered(2, 37, 16, dtype=torch.float32)  # 3 x 3 tiles, the last block 5 tokens long
    mask = random_mask(2, 37)

    def gradient(**kwargs):
        return gradients(lambda x: simreg_loss(x, labels, mask, 0.05, block_size=16, kernel="triton", **kwargs).loss,
                         hidden)[1]

    def in_reverse(x, y, z):  # the interpreter runs the grid's programs one by one: the last first
        nx, ny, nz = interpreter_builder.grid_dim
        type(interpreter_builder).set_grid_idx(interpreter_builder, nx - 1 - x, ny - 1 - y, nz - 1 - z)

    atomic, deterministic = gradient(), gradient(deterministic=True)
    interpreter_builder.set_grid_idx = in_reverse
    try:
        atomic_reversed, deterministic_reversed = gradient(), gradient(deterministic=True)
    finally:
        del interpreter_builder.set_grid_idx
    torch.use_deterministic_algorithms(True)
    try:
        under_torch_flag = gradient()
    finally:
        torch.use_deterministic_algorithms(False)

    _, ref = gradients(lambda x: reference_loss(x, labels, mask, 0.05, None, "group"), hidden.double())
    tolerance = logit_tolerance(16, 0.05) * ref.abs().max().item()
    for grad in (atomic, deterministic):
        torch.testing.assert_close(grad.double(), ref, rtol=0, atol=tolerance)
    torch.testing.assert_close(atomic, deterministic, rtol=0, atol=tolerance)
    assert not torch.equal(atomic_reversed, atomic), "the reversed order must reorder the atomic sums"
    assert torch.equal(deterministic_reversed, deterministic) and torch.equal(under_torch_flag, deterministic)


def test_deterministic_backward_is_exact_and_independent_of_program_order(interpreter):
    """The backward without atomics (simreg.deterministic, or torch's deterministic algorithms as Megatron's
    --deterministic-mode sets them) equals the reference and the atomic backward, and gives the same bits when
    the programs run in reverse order, which changes the atomic backward's bits."""
    interpreter(deterministic_case)


TENSOR_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy", "to",
                "__getitem__", "equal")
TORCH_READS = ("tensor", "as_tensor", "nonzero", "unique", "equal", "allclose", "masked_select")


def reads_the_device(name, args, kwargs) -> bool:
    """Whether a call of `name` waits for a CUDA tensor's value: `.to` only when it names the host, as "cpu" (here
    every tensor is on the host, so `.to(hidden.device)`, which moves nothing on a GPU, must not count), indexing
    only with a boolean mask (its size is read back), any other listed call always."""
    if name == "to":
        return "cpu" in [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, str)]
    if name == "__getitem__":
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(getattr(part, "dtype", None) == torch.bool for part in index)
    return True


@contextlib.contextmanager
def host_syncs():
    """Records the calls made by megatron_simreg's own code that, on CUDA tensors, stall the host until the GPU's
    queue drains: a value read back (item, tolist, bool(), int(), nonzero, unique's size, boolean indexing) or a
    copy between host and device (cpu(), numpy(), `.to("cpu")`, a tensor made from Python data). Only calls whose
    caller is megatron_simreg's code count, so the Triton interpreter's own copies do not."""
    calls = []

    def counted(owner, name):
        original = getattr(owner, name)

        def call(*args, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith("megatron_simreg") and reads_the_device(name, args, kwargs):
                calls.append(f"{name} from {module}:{caller.f_lineno}")
            return original(*args, **kwargs)

        return mock.patch.object(owner, name, call)

    with contextlib.ExitStack() as patches:
        for owner, names in ((torch.Tensor, TENSOR_READS), (torch, TORCH_READS)):
            for name in names:
                patches.enter_context(counted(owner, name))
        yield calls


def host_syncs_case(chunk_size):
    """Labels that int32 (and float32) cannot tell apart, all alike modulo 2^32 and one negative, whose ranking was
    once decided on the host: no sync either, and they pair as the integers do."""
    interpreted()
    hidden, labels = clustered(2, 37, 16, dtype=torch.float32)
    mask = random_mask(2, 37)

    def forward_and_backward():
        x = hidden.clone().requires_grad_()
        out = simreg_loss(x, labels * 2**32 - 3, mask, 0.05, chunk_size, block_size=16, kernel="triton")
        out.loss.backward()
        return out.loss.detach()

    forward_and_backward()  # the first call builds what is cached per shape
    with host_syncs() as calls:
        loss = forward_and_backward()
    assert not calls, calls
    tiled = simreg_loss(hidden, labels, mask, 0.05, chunk_size, block_size=16, kernel="torch").loss
    torch.testing.assert_close(loss, tiled, rtol=logit_tolerance(16, 0.05), atol=0)


@pytest.mark.parametrize("chunk_size", [None, 10])
def test_no_host_sync_on_the_triton_path(interpreter, chunk_size):
    """`kernel: auto` on a GPU runs this path: nothing in SimReg's forward and backward waits for the device."""
    interpreter(host_syncs_case, chunk_size)


def test_kernel_must_be_known():
    hidden, labels = clustered(1, 8, 4)
    with pytest.raises(ValueError, match="kernel"):
        simreg_loss(hidden, labels, kernel="cuda")


def test_kernels_compile_for_hopper():
    """The GPU build of the kernels (the interpreter accepts code the compiler rejects): Triton lowers them to an
    sm_90 binary with its bundled ptxas, no GPU needed; bf16 tiles must not spill registers; the backward's
    atomics are relaxed (not acq_rel, a fence per element) and the deterministic backward has none; fp16's backwards
    (W rounded to TF32) build too."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron_simreg.simreg import triton as simreg_triton

    names = {"scale": "*fp32", "key_scale": "*fp32", "labels": "*i32", "key_labels": "*i32", "tile_rows": "*i32",
             "tile_cols": "*i32", "partials": "*fp32", "angles": "*fp32", "stats": "*fp32", "key_stats": "*fp32",
             "grad_units": "*fp32", "radial": "*fp32", "temperature": "fp32"}
    kernels = [
        (simreg_triton._forward_kernel, {}),
        (simreg_triton._backward_kernel, {"SYMMETRIC": True}),
        (simreg_triton._deterministic_backward_kernel, {}),
        (simreg_triton._normalize_backward_kernel, {}),
    ]
    # fp16: the backwards' W rounded to TF32 by its bits, with a program count past 2^31 (an i64 argument).
    for dtype, precision, chosen in (("bf16", None, kernels), ("fp32", simreg_triton.DOT_PRECISION, kernels),
                                     ("fp16", simreg_triton.FP16_W_PRECISION, kernels[1:3])):
        constants = {"BLOCK": simreg_triton.BLOCK, "BLOCK_K": simreg_triton.BLOCK_K, "PRECISION": precision,
                     "DOT_DTYPE": tl.bfloat16 if dtype == "bf16" else tl.float32, "BLOCK_T": 16}
        for kernel, extra in chosen:
            signature = {name: "constexpr" if i in kernel.constexprs else names.get(name, "i32") for i, name in
                         enumerate(kernel.arg_names)}
            signature.update({name: f"*{dtype}" for name in ("hidden", "keys", "grad_hidden") if name in signature})
            signature["programs"] = "i64" if dtype == "fp16" else "i32"
            constexprs = {name: value for name, value in {**constants, **extra}.items() if name in signature}
            source = ASTSource(kernel, signature, constexprs=constexprs)
            options = {"num_warps": simreg_triton.NUM_WARPS}
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            atomics = set(re.findall(r"\b(?:atom|red)\.[\w.]+", compiled.asm["ptx"]))
            expected = {"atom.global.gpu.relaxed.add.f32"} if kernel is simreg_triton._backward_kernel else set()
            assert atomics == expected, f"{kernel.__name__}: {sorted(atomics)}"  # relaxed, or none at all
            if dtype == "bf16":
                assert "STACK:0 " in resource_usage(compiled.asm["cubin"]), f"{kernel.__name__} spills registers"


def resource_usage(cubin: bytes) -> str:
    """Registers and stack (spills) of a compiled kernel, by the cuobjdump that ships with Triton."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([tool, "--dump-resource-usage", file.name], capture_output=True, text=True, check=True)
        return report.stdout


def test_config_chooses_the_kernel():
    from megatron_simreg.config import ConfigError, load_config
    from megatron_simreg.objective import SimRegObjective

    assert load_config("configs/tiny-llama.yaml").simreg.kernel == "auto"
    cfg = load_config("configs/tiny-llama.yaml", ["simreg.kernel=torch"])
    assert SimRegObjective.from_config(cfg).kernel == "torch"
    assert not SimRegObjective.from_config(cfg).deterministic
    cfg = load_config("configs/tiny-llama.yaml", ["simreg.deterministic=true"])
    assert SimRegObjective.from_config(cfg).deterministic
    with pytest.raises(ConfigError, match="simreg.kernel must be one of auto, torch, triton"):
        load_config("configs/tiny-llama.yaml", ["simreg.kernel=cuda"])
