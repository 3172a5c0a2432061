"""Train a small LocalNorm transformer with Muon (hidden matrices) and AdamW (the rest).

    python examples/train_with_muon.py --steps 40

`ln.optim.make_optimizer("muon", model)` splits the parameters into groups itself ("normuon"
and "scion" take the same call). The data is a synthetic sequence task (each
token is the previous one plus 1, modulo the vocabulary), so the loss must fall to near 0.
"""

import argparse

import mlx_localnorm as ln  # first: it picks a fast CPU BLAS before mlx.core loads
import mlx.core as mx
import mlx.nn as nn


def batch(vocab: int, size: int, length: int) -> mx.array:
    start = mx.random.randint(0, vocab, (size, 1))
    return (start + mx.arange(length + 1)) % vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--norm", default="seednorm", choices=sorted(ln.NORMS))
    parser.add_argument("--placement", default="peri", choices=sorted(ln.PLACEMENTS))
    args = parser.parse_args()

    mx.random.seed(0)
    model = ln.Model(ln.ModelArgs(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  norm_type=args.norm, placement=args.placement))
    optimizer = ln.optim.make_optimizer("muon", model, learning_rate=0.02,
                                        adamw_learning_rate=3e-3)

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")

    step = nn.value_and_grad(model, loss_fn)
    for i in range(args.steps):
        loss, grads = step(model, batch(64, 8, 16))
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        if i == 0 or (i + 1) % 10 == 0 or i + 1 == args.steps:
            print(f"step {i + 1:4d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
