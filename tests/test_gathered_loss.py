"""The fine-tuning loss that runs the LM head on the trained positions only.

Its value is checked against float64 NumPy over the full logits, its gradient against a
masked mean written here over the full logits; the per-width bound of trained positions
against hand counts and against every batch of several epochs.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama
from test_models import VOCAB, tiny_model

from mlx_localnorm.data.sft import Example, SFTBatches
from mlx_localnorm.train.adapters import apply_mode
from mlx_localnorm.train.gathered_loss import gather_plan, gathered_cross_entropy, splits_head

LORA = {"rank": 3, "scale": 4.0, "dropout": 0.0}


def masked_nll64(logits, targets, mask) -> float:
    """Weighted mean of -log p(target) over the mask, in float64 NumPy."""
    z = np.array(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.array(targets)[..., None], -1)[..., 0]
    m = np.array(mask, np.float64)
    return float(-(picked * m).sum() / m.sum())


def full_logits_loss(model, inputs, targets, mask):
    ce = nn.losses.cross_entropy(model(inputs), targets)
    return (ce * mask).sum() / mask.sum()


def batch(seed=0):
    """Three rows of width 9: a prompt-masked row, a padded row, an empty (padding) row;
    one weight of 0.5 to show weights are carried, not just the positions."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, VOCAB, (3, 9))
    targets = rng.integers(0, VOCAB, (3, 9))
    mask = np.zeros((3, 9), np.float32)
    mask[0, 4:] = 1
    mask[1, 1:6] = 1
    mask[1, 2] = 0.5
    return mx.array(inputs), mx.array(targets), mx.array(mask)


def test_gather_plan_lists_the_trained_positions_then_zero_padding():
    mask = mx.array([[0, 1, 0, 0.5], [1, 0, 0, 0]])
    positions, weights = gather_plan(mask, 5)
    assert positions.tolist() == [1, 3, 4, 0, 0]
    assert weights.tolist() == [1.0, 0.5, 1.0, 0.0, 0.0]
    assert positions.dtype == mx.int32
    with pytest.raises(ValueError, match="3 nonzero positions, more than size=2"):
        gather_plan(mask, 2)


MODELS = {
    "tied-seednorm": dict(norm_type="seednorm", placement="peri"),
    "untied": dict(tie_word_embeddings=False),
    "ngpt-logit-scale": dict(norm_type=None, placement="ngpt"),
}


@pytest.mark.parametrize("case", list(MODELS))
@pytest.mark.parametrize("slack", [0, 4])
def test_value_and_gradient_equal_the_full_logits_masked_mean(case, slack):
    """With LoRA on (as fine-tuning runs it) and `slack` padding slots past the trained
    positions: the loss is float64 NumPy's masked mean of the full logits and every
    trainable gradient equals the full-logits loss's."""
    model = tiny_model(**MODELS[case])
    apply_mode(model, "lora", num_layers=2, lora_parameters=LORA)
    mx.random.seed(1)  # LoRA's B starts at 0, which would make A's gradient 0 too
    model.update(tree_map(lambda p: p + 0.1 * mx.random.normal(p.shape),
                          model.trainable_parameters()))
    inputs, targets, mask = batch()
    size = int(np.count_nonzero(np.array(mask))) + slack
    plan = gather_plan(mask, size)
    got, grads = nn.value_and_grad(model, gathered_cross_entropy)(model, inputs, targets, *plan)
    want = masked_nll64(model(inputs), targets, mask)
    assert abs(got.item() - want) < 1e-5 * want
    _, want_grads = nn.value_and_grad(model, full_logits_loss)(model, inputs, targets, mask)
    got_grads, want_grads = dict(tree_flatten(grads)), dict(tree_flatten(want_grads))
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name, g in want_grads.items():
        scale = float(mx.abs(g).max())
        assert scale > 0, name
        assert float(mx.abs(got_grads[name] - g).max()) < 1e-4 * scale, name


@pytest.mark.parametrize("size", [0, 4])
def test_an_empty_mask_gives_zero_loss_and_gradient(size):
    """An all-masked batch (size 0: its width holds no trained token at all) is a zero
    loss with zero gradients, not NaN or an error."""
    model = tiny_model()
    inputs, targets, _ = batch()
    plan = gather_plan(mx.zeros((3, 9)), size)
    assert plan[0].size == max(size, 1) and plan[1].sum().item() == 0
    loss, grads = nn.value_and_grad(model, gathered_cross_entropy)(model, inputs, targets, *plan)
    assert loss.item() == 0.0
    assert all(float(mx.abs(g).max()) == 0 for _, g in tree_flatten(grads))


def test_out_of_range_token_ids_are_refused_as_by_the_model():
    model = tiny_model()
    inputs, targets, mask = batch()
    inputs[0, 0] = VOCAB
    with pytest.raises(ValueError, match="token ids must be in"):
        gathered_cross_entropy(model, inputs, targets, *gather_plan(mask, 16))


def test_which_models_split_their_head():
    assert splits_head(tiny_model())
    args = llama.ModelArgs(model_type="llama", hidden_size=16, num_hidden_layers=1,
                           intermediate_size=32, num_attention_heads=2, rms_norm_eps=1e-5,
                           vocab_size=VOCAB)
    assert not splits_head(llama.Model(args))  # mlx-lm models keep the full-logits loss


def example(length: int, trained: list[int]) -> Example:
    """`length` tokens; the mask is 1 at the token indices in `trained`."""
    mask = np.zeros(length, bool)
    mask[trained] = True
    return Example(np.arange(length, dtype=np.int32) % VOCAB, mask)


def test_trained_bound_hand_counted():
    """Targets are tokens[1:L+1], so a mask bit on token 0 never counts; an example counts
    for a width only if its L = len - 1 fits (capped at max_seq_len)."""
    examples = [
        example(5, [0, 1, 2, 3, 4]),   # L 4, counts 4 (token 0 is no target)
        example(9, [5, 6, 7, 8]),      # L 8, counts 4
        example(9, [2, 3, 4, 5, 6, 7, 8]),  # L 8, counts 7
        example(3, [2]),               # L 2, counts 1
        example(20, list(range(20))),  # L 19 -> 12 at max_seq_len 12, counts 12
    ]
    with pytest.warns(UserWarning, match="1 of 5 examples are longer"):
        batches = SFTBatches(examples, batch_size=2, max_seq_len=12, pad_to=4)
    assert batches.trained_bound(4) == 4 + 1
    assert batches.trained_bound(8) == 7 + 4
    assert batches.trained_bound(12) == 12 + 7
    with pytest.warns(UserWarning, match="truncated"):
        sharded = SFTBatches(examples, batch_size=2, max_seq_len=12, pad_to=4, rank=1,
                             world_size=2)
    assert sharded.trained_bound(8) == 7  # one row per rank


def test_trained_bound_holds_for_every_batch_of_several_epochs():
    rng = np.random.default_rng(3)
    examples = []
    for _ in range(40):
        length = int(rng.integers(2, 40))
        examples.append(example(length, sorted(rng.choice(length, rng.integers(1, length + 1),
                                                          replace=False).tolist())))
    with pytest.warns(UserWarning, match="truncated"):  # the cap is part of the bound
        batches = SFTBatches(examples, batch_size=4, max_seq_len=32, pad_to=8, seed=1)
    for _ in range(3 * batches.steps_per_epoch):
        inputs, _, mask = next(batches)
        count = int(np.count_nonzero(np.array(mask)))
        bound = batches.trained_bound(inputs.shape[1])
        assert count <= bound <= mask.size
    assert bound < mask.size  # the bound saves positions here, not just B * T
