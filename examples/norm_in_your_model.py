"""Use a LocalNorm norm inside your own MLX model, and train it for a few steps.

    python examples/norm_in_your_model.py --norm seednorm --steps 50

A small MLP classifier on a synthetic task; the norm is one line (`ln.make_norm`), any name
of `ln.NORMS` works (seednorm, rmsnorm, layernorm, patchnorm, dyt, l2norm, angpt).
"""

import argparse

import mlx_localnorm as ln  # first: it picks a fast CPU BLAS before mlx.core loads
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim


class Classifier(nn.Module):
    def __init__(self, dims: int, hidden: int, classes: int, norm: str):
        super().__init__()
        self.inp = nn.Linear(dims, hidden)
        self.norm = ln.make_norm(norm, hidden)  # the only LocalNorm line
        self.out = nn.Linear(hidden, classes)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out(nn.gelu(self.norm(self.inp(x))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default="seednorm", choices=sorted(ln.NORMS))
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    mx.random.seed(0)
    dims, classes = 16, 4
    x = mx.random.normal((512, dims))
    labels = mx.argmax(x[:, :classes], axis=-1)  # a learnable rule: the largest of 4 inputs
    model = Classifier(dims, 64, classes, args.norm)
    optimizer = optim.Adam(learning_rate=1e-2)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    step = nn.value_and_grad(model, loss_fn)
    for i in range(args.steps):
        loss, grads = step(model, x, labels)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        if i == 0:
            first = loss.item()
    accuracy = (mx.argmax(model(x), axis=-1) == labels).mean().item()
    print(f"{type(model.norm).__name__}: loss {first:.3f} -> {loss.item():.3f}, "
          f"train accuracy {accuracy:.2f}")


if __name__ == "__main__":
    main()
