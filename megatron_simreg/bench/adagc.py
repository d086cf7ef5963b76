"""AdaGC's cost per optimizer step: `python -m megatron_simreg.bench.adagc`.

On a parameter set shaped like LLaMA2-350M (Table 4: 24 layers, hidden 1024, FFN 2371, 32k untied
vocabulary) with random gradients, times AdamW's step, Megatron-style global-norm clipping, and AdaGC's
per-tensor clipping after its warm-up in two cases: a typical step (no tensor over its threshold: the
norms only) and the worst case (every tensor over it: norms and scaling). Prints each as a ratio to the
AdamW step, and AdaGC's added time over the clipping it replaces (Megatron clips to 1.0 by default:
a norm pass every step, a scaling pass when the norm is over 1) as a share of that optimizer step.
"""

import argparse
import statistics
import time

import torch

from megatron_simreg.adagc import AdaGC, AdaGCConfig, GradShard


def llama_350m_shapes(layers=24, hidden=1024, ffn=2371, vocab=32000):
    shapes = {"embedding.word_embeddings.weight": (vocab, hidden), "output_layer.weight": (vocab, hidden),
              "decoder.final_layernorm.weight": (hidden,)}
    for i in range(layers):
        prefix = f"decoder.layers.{i}."
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "self_attention.linear_qkv.weight": (3 * hidden, hidden),
            prefix + "self_attention.linear_proj.weight": (hidden, hidden),
            prefix + "pre_mlp_layernorm.weight": (hidden,),
            prefix + "mlp.linear_fc1.weight": (2 * ffn, hidden),
            prefix + "mlp.linear_fc2.weight": (hidden, ffn),
        })
    return shapes


def timed(fn, repeats, setup=lambda: None):
    """Median time of `fn`, with `setup` run (untimed) before each call."""
    setup()
    fn()
    times = []
    for _ in range(repeats):
        setup()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = llama_350m_shapes()
    params = {name: torch.nn.Parameter(torch.randn(shape, device=device) * 0.02) for name, shape in shapes.items()}
    for param in params.values():
        param.grad = torch.randn_like(param) * 1e-3
    grads = [p.grad for p in params.values()]
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    shards = [GradShard(name, p.grad) for name, p in params.items()]
    original = [g.clone() for g in grads]
    norms = {s.name: float(s.grad.norm()) for s in shards}
    adagc = AdaGC(AdaGCConfig(warmup_steps=1))
    adagc.clip(shards)  # the warm-up step

    def past_warmup_with_thresholds(scale):
        """Untimed: the original gradients back, and every threshold at `scale` times its tensor's norm."""
        def setup():
            torch._foreach_copy_(grads, original)
            adagc.gamma = {name: scale * norm for name, norm in norms.items()}
        return setup

    def global_norm_clip(max_norm):  # Megatron's clip_grad_norm: a norm pass, a scaling pass if over max_norm
        def clip():
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            coefficient = max_norm / (float(norm) + 1e-6)
            if coefficient < 1.0:
                torch._foreach_mul_(grads, coefficient)
        return clip

    adam = timed(optimizer.step, args.repeats)
    setup = past_warmup_with_thresholds(1.0)
    megatron_norm = timed(global_norm_clip(1e9), args.repeats, setup)
    megatron_scaled = timed(global_norm_clip(1e-3), args.repeats, setup)
    clip = lambda: adagc.clip(shards)  # noqa: E731
    typical = timed(clip, args.repeats, past_warmup_with_thresholds(10.0))
    worst = timed(clip, args.repeats, past_warmup_with_thresholds(1e-3))
    rows = [("AdamW step", adam), ("Megatron's global-norm clipping, norm under max (norm pass)", megatron_norm),
            ("Megatron's global-norm clipping, norm over max (norm and scaling)", megatron_scaled),
            ("AdaGC, no tensor clipped (typical step)", typical), ("AdaGC, every tensor clipped (worst case)", worst)]
    total = sum(p.numel() for p in params.values())
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        "# AdaGC on a LLaMA2-350M-shaped parameter set "
        f"({total / 1e6:.0f}M parameters, {len(params)} tensors, fp32, {where})"
    )
    print("| operation | time (ms) | ratio to AdamW step |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / adam:.3f}x |")
    print("\nAdaGC's added time over the clipping it replaces, as a share of that optimizer step (AdamW + clipping):")
    for case, ours, theirs in (("typical", typical, megatron_norm), ("worst case", worst, megatron_scaled)):
        print(f"- {case}: {(ours - theirs) * 1e3:+.1f} ms, {(ours - theirs) / (adam + theirs):+.1%}")


if __name__ == "__main__":
    main()
