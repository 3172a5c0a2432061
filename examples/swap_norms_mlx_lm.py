"""Give an mlx-lm model other norms and another placement, in place, with `ln.swap_norms`.

    python examples/swap_norms_mlx_lm.py
    python examples/swap_norms_mlx_lm.py --model path/to/mlx-lm/model   # a local checkpoint

Without --model it builds a small random mlx-lm Llama (no download). SeeDNorm equals RMSNorm
at initialization and Pre-LN is where the checkpoint's norms already sit, so the swapped model
gives the same logits until it is trained; Peri-LN adds norms and changes them.
"""

import argparse

import mlx_localnorm as ln  # first: it picks a fast CPU BLAS before mlx.core loads
import mlx.core as mx
from mlx_lm.models import llama


def make_model(path: str | None):
    """A local mlx-lm model, or a small random Llama."""
    if path is not None:
        import mlx_lm

        return mlx_lm.load(path)[0]
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
                           intermediate_size=128, num_attention_heads=4, rms_norm_eps=1e-5,
                           vocab_size=256)
    return llama.Model(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local mlx-lm model directory (default: a small "
                        "random Llama)")
    args = parser.parse_args()

    mx.random.seed(0)
    reference = make_model(args.model)
    tokens = mx.array([[1, 5, 9, 42, 7, 3]])
    before = reference(tokens)

    for norm, placement in (("seednorm", "pre"), ("seednorm", "peri"), ("dyt", "pre")):
        model = make_model(args.model)
        model.update(reference.parameters())  # the same weights as the reference
        ln.swap_norms(model, norm=norm, placement=placement)
        change = mx.abs(model(tokens) - before).max().item()
        kinds = sorted({type(m).__name__ for _, m in model.named_modules()
                        if type(m).__name__ in {c.__name__ for c in ln.NORMS.values()}})
        print(f"{norm:9s} {placement:5s} norms {', '.join(kinds)}: max logit change {change:.2e}")


if __name__ == "__main__":
    main()
