"""ln.optim.Averaged: the uniform mean of the parameters over the last updates, against a
float64 NumPy trajectory, in compiled steps, through checkpoints and in float32 for
low-precision weights."""

from functools import partial

import mlx.core as mx
import mlx.optimizers as mlx_optim
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from mlx_localnorm.optim import Averaged
from mlx_localnorm.train.checkpoint import load_checkpoint, save_checkpoint

LR = 0.1


def gradients(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"weight": rng.standard_normal((3, 4)), "bias": rng.standard_normal(3)}
            for _ in range(steps)]


def reference_mean(start: dict, grads: list, first: int) -> dict[str, np.ndarray]:
    """Plain SGD in float64, then the mean of the parameters after updates first..T."""
    params = {k: np.asarray(v, np.float64) for k, v in start.items()}
    kept = []
    for t, grad in enumerate(grads, 1):
        params = {k: params[k] - LR * grad[k] for k in params}
        if t >= first:
            kept.append(params)
    if not kept:  # before the window opens the average is the latest parameters
        return params
    return {k: np.mean([p[k] for p in kept], axis=0) for k in params}


def fresh_layer() -> nn.Linear:
    mx.random.seed(3)
    return nn.Linear(4, 3)


def as_numpy(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v, np.float64) for k, v in tree_flatten(tree)}


@pytest.mark.parametrize("start,steps", [(1, 5), (4, 7), (7, 7), (6, 3)])
def test_the_mean_of_the_parameters_after_updates_start_to_t(start, steps):
    layer = fresh_layer()
    initial = as_numpy(layer.parameters())
    optimizer = Averaged(mlx_optim.SGD(learning_rate=LR), start=start)
    grads = gradients(steps)
    for grad in grads:
        optimizer.update(layer, {k: mx.array(v, mx.float32) for k, v in grad.items()})
    got = as_numpy(optimizer.averaged(layer.trainable_parameters()))
    want = reference_mean(initial, grads, start)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # the model trains with the wrapped optimizer's parameters, not the mean
    last = reference_mean(initial, grads, steps)
    for key, value in as_numpy(layer.parameters()).items():
        np.testing.assert_allclose(value, last[key], rtol=1e-5, atol=1e-6, err_msg=key)


def compiled_step(layer, optimizer):
    state = [layer.state, optimizer.state]

    def loss(model, x):
        return (model(x) ** 2).sum()

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x):
        value, grads = nn.value_and_grad(layer, loss)(layer, x)
        optimizer.update(layer, grads)
        return value

    return step


def run_compiled(layer, optimizer, inputs):
    step = compiled_step(layer, optimizer)
    for x in inputs:
        mx.eval(step(x), layer.state, optimizer.state)


def test_inside_mx_compile_equals_eager_and_resumes_exactly_from_a_checkpoint(tmp_path):
    """Adam under the average, steps compiled: same mean as eager steps; stopped after three
    of six steps, saved, restored into a fresh layer and optimizer, the mean and the
    weights continue as if never stopped."""
    inputs = [mx.array(np.random.default_rng(i).standard_normal((2, 4)), mx.float32)
              for i in range(6)]

    def make():
        layer = fresh_layer()
        optimizer = Averaged(mlx_optim.Adam(learning_rate=1e-2), start=3)
        optimizer.init(layer.trainable_parameters())
        return layer, optimizer

    eager_layer, eager = make()
    for x in inputs:
        grads = nn.value_and_grad(eager_layer, lambda m, x: (m(x) ** 2).sum())(eager_layer, x)[1]
        eager.update(eager_layer, grads)
    want = as_numpy(eager.averaged(eager_layer.trainable_parameters()))

    layer, optimizer = make()
    run_compiled(layer, optimizer, inputs[:3])
    save_checkpoint(tmp_path, 3, layer, optimizer, {})
    resumed_layer, resumed = make()
    load_checkpoint(tmp_path / "checkpoints" / "step_0000003", resumed_layer, resumed)
    assert resumed.state["averaging"]["count"].item() == 3
    run_compiled(resumed_layer, resumed, inputs[3:])
    got = as_numpy(resumed.averaged(resumed_layer.trainable_parameters()))
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    for key, value in as_numpy(eager_layer.parameters()).items():
        np.testing.assert_allclose(as_numpy(resumed_layer.parameters())[key], value,
                                   rtol=1e-6, atol=1e-7, err_msg=key)


def test_bfloat16_weights_are_averaged_in_float32():
    """bf16 weights 1 + k/128 (k = 1..64, exact in bf16): the mean 1 + 32.5/128 is kept in
    float32 (a bf16 one rounds it to a multiple of 1/128) and handed back as bf16."""
    layer = nn.Linear(1, 1, bias=False)
    layer.weight = mx.ones((1, 1), mx.bfloat16)
    optimizer = Averaged(mlx_optim.SGD(learning_rate=1.0 / 128), start=1)
    for _ in range(64):
        optimizer.update(layer, {"weight": -mx.ones((1, 1), mx.bfloat16)})
    assert layer.weight.item() == 1.5
    mean = optimizer.state["averaging"]["mean"]["weight"]
    assert mean.dtype == mx.float32
    assert mean.item() == pytest.approx(1 + 32.5 / 128, rel=1e-6)
    exported = optimizer.averaged(layer.trainable_parameters())["weight"]
    assert exported.dtype == mx.bfloat16
    assert exported.item() == mean.astype(mx.bfloat16).item()


def test_only_the_trained_parameters_are_averaged_and_the_rate_is_the_wrapped_ones():
    layer = fresh_layer()
    layer.freeze(keys=["bias"])
    schedule = mlx_optim.linear_schedule(1e-2, 0.0, 10)
    optimizer = Averaged(mlx_optim.Adam(learning_rate=schedule), start=1)
    grads = nn.value_and_grad(layer, lambda m: m(mx.ones((1, 4))).sum())(layer)[1]
    optimizer.update(layer, grads)
    assert set(optimizer.state["averaging"]["mean"]) == {"weight"}
    # the rate the wrapped Adam used for its first step, not the start of the schedule
    assert optimizer.learning_rate.item() == pytest.approx(schedule(0).item())
    optimizer.update(layer, grads)
    assert optimizer.learning_rate.item() == pytest.approx(schedule(1).item())


def test_bad_arguments_and_state_are_refused_naming_them():
    with pytest.raises(TypeError, match="Averaged: optimizer must be an "
                       "mlx.optimizers.Optimizer, got dict"):
        Averaged({})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"start must be an int >= 1, got {bad!r}"):
            Averaged(mlx_optim.SGD(learning_rate=0.1), start=bad)
    optimizer = Averaged(mlx_optim.SGD(learning_rate=0.1))
    with pytest.raises(ValueError, match="nothing averaged yet"):
        optimizer.averaged({"weight": mx.zeros(1)})
    with pytest.raises(ValueError, match=r"keys 'optimizer' and 'averaging', got \['step'\]"):
        optimizer.state = {"step": mx.array(0)}
