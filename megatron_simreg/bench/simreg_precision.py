"""Precision of SimReg's products against float64: `python -m megatron_simreg.bench.simreg_precision`.

On any machine it emulates the fused Triton kernel's arithmetic (`megatron_simreg.simreg.triton`) with each
choice of product precision, rounding the products' inputs as the tensor cores would (TF32: 10-bit mantissa,
bf16: 7-bit) and computing the rest in float64, for float32, bf16 and fp16 hidden states; with `--device cuda` it
also runs the real kernels (Triton with each `DOT_PRECISION`, the PyTorch path with TF32 forced on globally). Both
print the relative error of the loss and of its gradient (norm of the difference over the norm) against the
float64 SimReg of the same hidden states (after their rounding to bf16 or fp16): what a choice costs.

Data as trained final layers look (a shared direction, per-label directions, noise), tau = 0.01, 200 labels,
token reduction; the shapes of the handed-over probe (docs/performance.md has the figures).
"""

import argparse

import torch
import torch.nn.functional as F

SHAPES = ((1024, 1024), (4096, 1024), (1024, 2048))
TEMPERATURE = 0.01


def anisotropic(h, s, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 200, (s,), generator=gen)
    centers = torch.randn(200, h, generator=gen, dtype=torch.float64)
    common = torch.randn(h, generator=gen, dtype=torch.float64)
    hidden = 1.15 * common + 0.35 * centers[labels] + 0.2 * torch.randn(s, h, generator=gen, dtype=torch.float64)
    return hidden, labels


def tf32(x, to_nearest=True):
    """Round float32 to TF32 (10-bit mantissa): to nearest, or truncated as tensor cores read an fp32 operand."""
    bits = x.float().view(torch.int32)
    return ((bits + 0x1000 * to_nearest) & ~0x1FFF).view(torch.float32)


ROUNDING = {
    "fp32": lambda x: x.float().double(),
    "tf32": lambda x: tf32(x).double(),
    "tf32, truncated": lambda x: tf32(x, to_nearest=False).double(),
    "bf16": lambda x: x.bfloat16().double(),
    "fp16": lambda x: x.half().double(),
}


def reference(hidden, labels):
    """Float64 SimReg (token mean of softplus(Lsr)) and its gradient, by autograd."""
    x = hidden.clone().requires_grad_()
    loss = simreg_from_logits(logits(x), labels)[0]
    loss.backward()
    return loss.detach(), x.grad


def logits(hidden):
    units = F.normalize(hidden, dim=-1)
    return units @ units.T / TEMPERATURE


def simreg_from_logits(z, labels):
    same = labels[:, None] == labels[None, :]
    lse_pos = torch.logsumexp(z.masked_fill(~same, float("-inf")), -1)
    lse_neg = torch.logsumexp(z.masked_fill(same, float("-inf")), -1)
    lsr = lse_neg - lse_pos
    return F.softplus(lsr).mean(), lse_pos, lse_neg, lsr, same


def emulated(hidden, labels, forward_inputs, w_rounding, backward_inputs):
    """The Triton kernel's arithmetic: z from the raw hidden states' products (inputs rounded as the dot sees
    them) times the per-token scales; W = G + G^T from z and the log-sum-exps, rounded, times the hidden states."""
    s = hidden.shape[0]
    scale = 1.0 / (hidden.norm(dim=-1) * TEMPERATURE**0.5)
    rounded = forward_inputs(hidden)
    z = (rounded @ rounded.T) * scale[:, None] * scale[None, :]
    loss, lse_pos, lse_neg, lsr, same = simreg_from_logits(z, labels)
    g = torch.sigmoid(lsr) / s
    shift = torch.where(same, lse_pos[:, None], lse_neg[:, None])
    sign = torch.where(same, -1.0, 1.0)
    rows = g[:, None] * torch.exp(z - shift)
    w = sign * (rows + rows.T)
    grad_units = w_rounding(w * scale[None, :]) @ backward_inputs(hidden)
    along = TEMPERATURE * scale**2 * (hidden * grad_units).sum(-1)
    return loss, scale[:, None] * (grad_units - along[:, None] * hidden)


def relative_errors(loss, grad, ref_loss, ref_grad):
    loss_error = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
    return loss_error, ((grad - ref_grad).norm() / ref_grad.norm()).item()


EMULATED = {
    # (input dtype, choice): (forward inputs, W in backward, hidden states in backward)
    ("fp32", "ieee / tf32x3"): ("fp32", "fp32", "fp32"),
    ("fp32", "tf32"): ("tf32", "tf32", "tf32"),
    ("bf16", "W in bf16"): ("fp32", "bf16", "fp32"),
    ("bf16", "W in tf32"): ("fp32", "tf32", "fp32"),
    ("bf16", "W in fp32"): ("fp32", "fp32", "fp32"),
    ("fp16", "W in tf32"): ("fp32", "tf32", "fp32"),
    ("fp16", "W in tf32, truncated"): ("fp32", "tf32, truncated", "fp32"),
    ("fp16", "W in fp32"): ("fp32", "fp32", "fp32"),
}


def emulation_table():
    print("| h, s | input | products | loss rel. error | gradient rel. error |")
    print("|---|---|---|---|---|")
    for h, s in SHAPES:
        exact, labels = anisotropic(h, s)
        for (dtype, choice), rounding in EMULATED.items():
            hidden = exact if dtype == "fp32" else ROUNDING[dtype](exact)
            ref_loss, ref_grad = reference(hidden, labels)
            loss, grad = emulated(hidden, labels, *(ROUNDING[r] for r in rounding))
            print(f"| {h}, {s} | {dtype} | {choice} | %.1e | %.1e |" % relative_errors(loss, grad, ref_loss, ref_grad))


def device_table(device):
    from megatron_simreg.simreg import simreg_loss
    from megatron_simreg.simreg import triton as simreg_triton

    print(f"| h, s | input | kernel | loss rel. error | gradient rel. error |  ({torch.cuda.get_device_name()})")
    print("|---|---|---|---|---|")
    saved = simreg_triton.DOT_PRECISION, torch.backends.cuda.matmul.fp32_precision
    try:
        for h, s in SHAPES:
            exact, labels = anisotropic(h, s)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                hidden = exact.to(dtype)
                ref_loss, ref_grad = reference(hidden.double(), labels)
                variants = [("torch, TF32 forced on", "torch", None, "tf32")]
                variants += [(f"triton, {p}", "triton", p, "ieee") for p in ("ieee", "tf32", "tf32x3")]
                for name, kernel, precision, global_precision in variants:
                    if precision is not None:
                        simreg_triton.DOT_PRECISION = precision
                    torch.backends.cuda.matmul.fp32_precision = global_precision
                    x = hidden.to(device).requires_grad_()
                    loss = simreg_loss(x[None], labels[None].to(device), reduction="token", kernel=kernel).loss
                    loss.backward()
                    errors = relative_errors(loss.double().cpu(), x.grad.double().cpu(), ref_loss, ref_grad)
                    print(f"| {h}, {s} | {dtype} | {name} | %.1e | %.1e |" % errors)
    finally:
        simreg_triton.DOT_PRECISION, torch.backends.cuda.matmul.fp32_precision = saved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cuda: also run the real kernels")
    args = parser.parse_args(argv)
    print("# emulated products (float64 otherwise), against float64 SimReg, tau = 0.01")
    emulation_table()
    if args.device != "cpu":
        print("\n# the kernels themselves")
        device_table(args.device)


if __name__ == "__main__":
    main()
