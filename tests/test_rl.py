"""GRPO family (ln.rl) against float64 NumPy references written here from SPEC.md."""

import itertools
import re
from collections import Counter

import mlx.core as mx
import mlx.optimizers as mlx_optim
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

import mlx_localnorm as ln
from mlx_localnorm import rl

# ---------------------------------------------------------------- float64 references (SPEC)


def ref_advantages(rewards, group_size, mode, eps=1e-6):
    out = []
    for r in np.asarray(rewards, np.float64).reshape(-1, group_size):
        if np.all(r == r[0]):
            out.append(np.zeros_like(r))
        elif mode == "grpo":
            out.append((r - r.mean()) / (r.std() + eps))
        elif mode == "dr_grpo":
            out.append(r - r.mean())
        else:  # rloo: each sample's baseline is the mean of the others
            out.append(np.array([r[i] - np.delete(r, i).mean() for i in range(len(r))]))
    return np.concatenate(out)


def ref_policy_loss(lp, old, adv, mask, ref=None, beta=0.0, eps_low=0.2, eps_high=0.2,
                    ratio="token", normalize="sequence", max_len=None):
    m = mask.astype(np.float64)
    n = m.sum(axis=1)
    log_ratio = (lp - old) * m
    if ratio == "sequence":
        log_ratio = np.repeat((log_ratio.sum(axis=1) / n)[:, None], lp.shape[1], axis=1)
    rho = np.exp(log_ratio)
    a = adv[:, None]
    per_token = -np.minimum(rho * a, np.clip(rho, 1 - eps_low, 1 + eps_high) * a)
    if ref is not None:
        d = ref - lp
        per_token = per_token + beta * (np.exp(d) - d - 1)
    per_token = per_token * m
    if normalize == "sequence":
        return np.mean(per_token.sum(axis=1) / n)
    if normalize == "token":
        return per_token.sum() / m.sum()
    return per_token.sum() / (lp.shape[0] * (max_len or lp.shape[1]))


def numeric_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        g[idx] = (f(up) - f(down)) / (2 * h)
    return g


# ---------------------------------------------------------------- advantages

REWARDS = np.array([1.0, 0.0, 0.0, 1.0,  0.5, 0.5, 0.5, 0.5,  0.2, 0.9, 0.4, 0.0,
                    3.0, -1.0, 0.25, 0.25])


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_advantages_match_reference(mode, group_size):
    got = rl.group_advantages(mx.array(REWARDS), group_size, mode=mode)
    assert got.dtype == mx.float32 and got.shape == (len(REWARDS),)
    np.testing.assert_allclose(np.array(got), ref_advantages(REWARDS, group_size, mode),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "rloo"])
def test_equal_rewards_give_exactly_zero_advantage(mode):
    # 0.1 is not exact in float32: a computed mean could leave a tiny non-zero residue.
    got = np.array(rl.group_advantages([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], 3, mode=mode))
    assert np.all(got == 0.0)


def test_group_advantages_accept_lists_and_numpy():
    want = ref_advantages(REWARDS[:4], 2, "grpo")
    for rewards in (list(REWARDS[:4]), REWARDS[:4], REWARDS[:4].astype(np.float32)):
        np.testing.assert_allclose(np.array(rl.group_advantages(rewards, 2)), want, rtol=1e-5)


def test_drop_equal_groups_keeps_only_informative_groups():
    keep = rl.drop_equal_groups(REWARDS, 4)
    assert np.array(keep).tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]
    keep = rl.drop_equal_groups([2.0, 2.0, 1.0, 1.0], 2)
    assert keep.shape == (0,)
    keep = rl.drop_equal_groups([2.0, 2.0, 1.0, 3.0, 0.0, 0.0], 2)
    assert np.array(keep).tolist() == [2, 3]


@pytest.mark.parametrize("call, pattern", [
    (lambda: rl.group_advantages([1.0, 2.0], 1), r"group_size.*>= 2.*got 1"),
    (lambda: rl.group_advantages([1.0, 2.0, 3.0], 2), r"rewards.*multiple of group_size=2.*got 3"),
    (lambda: rl.group_advantages([1.0, float("nan"), 3.0, 4.0], 2),
     r"rewards.*finite.*got nan at index 1"),
    (lambda: rl.group_advantages([1.0, 2.0], 2, mode="ppo"),
     r"mode.*'grpo', 'dr_grpo', 'rloo'.*got 'ppo'"),
    (lambda: rl.group_advantages([[1.0, 2.0]], 2), r"rewards.*1-D.*got shape \(1, 2\)"),
    (lambda: rl.group_advantages([], 2), r"rewards.*at least one group.*got 0"),
    (lambda: rl.drop_equal_groups([1.0, float("inf")], 2), r"rewards.*finite.*got inf"),
])
def test_group_advantages_bad_input(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize("group_size", [2.0, True, "4"])
def test_group_size_must_be_an_int(group_size):
    with pytest.raises(TypeError, match=r"group_size.*int.*got"):
        rl.group_advantages([1.0, 2.0, 3.0, 4.0], group_size)


# ---------------------------------------------------------------- policy loss


def tiny_batch(seed=30):
    """Log-probs of 4 completions of lengths 5, 3, 1, 4; ratios both sides of the clip range."""
    rng = np.random.default_rng(seed)
    lp = rng.uniform(-3.0, -0.1, size=(4, 5))
    old = lp + rng.uniform(-0.4, 0.4, size=lp.shape)
    ref = lp + rng.uniform(-0.5, 0.5, size=lp.shape)
    mask = np.arange(5)[None, :] < np.array([5, 3, 1, 4])[:, None]
    adv = np.array([1.0, -0.5, 0.3, -1.2])
    return lp, old, ref, mask, adv


def test_tiny_batch_clips_on_both_sides_away_from_the_clip_edges():
    lp, old, _, mask, adv = tiny_batch()
    rho = np.exp(lp - old)
    a = np.broadcast_to(adv[:, None], rho.shape)
    for low, high in ((0.8, 1.2), (0.8, 1.28), (0.9, 1.3)):
        assert ((rho < low) & (a < 0))[mask].any() and ((rho > high) & (a > 0))[mask].any()
        assert ((rho > low) & (rho < high))[mask].any()
    for edge in (0.8, 0.9, 1.2, 1.28, 1.3):
        assert np.abs(rho[mask] - edge).min() > 1e-3


CASES = list(itertools.product(["token", "sequence"], ["sequence", "token", "constant"],
                               [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.1, 0.3, 0.04)]))


@pytest.mark.parametrize("ratio, normalize, clip_kl", CASES)
def test_policy_loss_value_and_grad_match_reference(ratio, normalize, clip_kl):
    lp, old, ref, mask, adv = tiny_batch()
    eps_low, eps_high, beta = clip_kl
    kw = dict(eps_low=eps_low, eps_high=eps_high, ratio=ratio, normalize=normalize)
    if normalize == "constant":
        kw["max_len"] = 3  # a completion budget: may be below the width (prompt positions)
    ref_mx = mx.array(ref, mx.float32) if beta else None

    def loss(x):
        return rl.policy_loss(x, mx.array(old, mx.float32), mx.array(adv, mx.float32),
                              mx.array(mask), ref_logprobs=ref_mx, beta=beta, **kw)[0]

    value, grad = mx.value_and_grad(loss)(mx.array(lp, mx.float32))

    def want(x):
        return ref_policy_loss(x, old, adv, mask, ref=ref if beta else None, beta=beta, **kw)

    np.testing.assert_allclose(value.item(), want(lp), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(grad), numeric_grad(want, lp), rtol=1e-4, atol=1e-6)


def test_policy_loss_metrics_match_reference():
    lp, old, ref, mask, adv = tiny_batch()
    _, metrics = rl.policy_loss(mx.array(lp), mx.array(old), mx.array(adv), mx.array(mask),
                                ref_logprobs=mx.array(ref), beta=0.04, eps_low=0.2,
                                eps_high=0.28)
    rho = np.exp(lp - old)
    a = np.broadcast_to(adv[:, None], rho.shape)
    low = (rho < 0.8) & (a < 0)
    high = (rho > 1.28) & (a > 0)
    d = ref - lp
    expected = {
        "clip_low_fraction": low[mask].mean(),
        "clip_high_fraction": high[mask].mean(),
        "clip_fraction": (low | high)[mask].mean(),
        "ratio_mean": rho[mask].mean(),
        "kl": (np.exp(d) - d - 1)[mask].mean(),
        "tokens": mask.sum(),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name].item(), value, rtol=1e-5, err_msg=name)


def test_kl_is_zero_at_the_reference():
    lp, old, _, mask, adv = tiny_batch()
    args = (mx.array(old, mx.float32), mx.array(adv, mx.float32), mx.array(mask))

    def loss(x, beta):
        return rl.policy_loss(x, *args, ref_logprobs=mx.stop_gradient(x), beta=beta)

    x = mx.array(lp, mx.float32)
    (with_kl, metrics), grad_kl = mx.value_and_grad(lambda x: loss(x, 0.5))(x)
    (no_kl, _), grad = mx.value_and_grad(lambda x: loss(x, 0.0))(x)
    assert metrics["kl"].item() == 0.0
    assert with_kl.item() == no_kl.item()
    np.testing.assert_array_equal(np.array(grad_kl), np.array(grad))


def test_on_policy_loss_is_minus_mean_advantage_with_its_gradient():
    # One update per rollout: pi_old = pi, ratio 1, gradient of rho * A (SPEC).
    lp, _, _, mask, adv = tiny_batch()
    (value, metrics), grad = mx.value_and_grad(
        lambda x: rl.policy_loss(x, None, mx.array(adv), mx.array(mask)))(mx.array(lp))
    n = mask.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(value.item(), -adv.mean(), rtol=1e-6)
    np.testing.assert_allclose(np.array(grad), -adv[:, None] * mask / n / len(adv), rtol=1e-6)
    assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_fraction"].item() == 0.0


def test_padding_values_do_not_leak_into_loss_or_gradient():
    lp, old, ref, mask, adv = tiny_batch()
    dirty = [a.copy() for a in (lp, old, ref)]
    for a, fill in zip(dirty, (-np.inf, 1e30, np.nan)):
        a[~mask] = fill

    def run(lp, old, ref):
        f = lambda x: rl.policy_loss(x, mx.array(old), mx.array(adv), mx.array(mask),
                                     ref_logprobs=mx.array(ref), beta=0.1, ratio="sequence")
        return mx.value_and_grad(f)(mx.array(lp, mx.float32))

    (clean, clean_metrics), clean_grad = run(lp, old, ref)
    (value, metrics), grad = run(*dirty)
    assert value.item() == clean.item()
    np.testing.assert_array_equal(np.array(grad), np.array(clean_grad))
    for name in clean_metrics:
        assert metrics[name].item() == clean_metrics[name].item(), name


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(old_logprobs=np.zeros((4, 4))), ValueError, r"old_logprobs.*shape \(4, 5\).*\(4, 4\)"),
    (dict(advantages=np.zeros((4, 1))), ValueError, r"advantages.*shape \(4,\).*\(4, 1\)"),
    (dict(mask=np.ones((3, 5))), ValueError, r"mask.*shape \(4, 5\).*\(3, 5\)"),
    (dict(logprobs=np.zeros(5)), ValueError, r"logprobs.*2-D.*got shape \(5,\)"),
    (dict(ratio="seq"), ValueError, r"ratio.*'token', 'sequence'.*got 'seq'"),
    (dict(normalize="mean"), ValueError, r"normalize.*'sequence', 'token', 'constant'.*'mean'"),
    (dict(eps_low=-0.1), ValueError, r"eps_low.*>= 0.*got -0.1"),
    (dict(eps_high=float("nan")), ValueError, r"eps_high.*>= 0.*got nan"),
    (dict(beta=0.1), ValueError, r"beta=0.1 needs ref_logprobs.*got None"),
    (dict(beta=-1.0, ref_logprobs=np.zeros((4, 5))), ValueError, r"beta.*>= 0.*got -1.0"),
    (dict(max_len=0, normalize="constant"), ValueError, r"max_len.*positive.*got 0"),
    (dict(max_len=8), ValueError, r"max_len.*normalize='constant'.*got normalize='sequence'"),
    (dict(max_len=2.5, normalize="constant"), TypeError, r"max_len.*int.*got 2.5"),
])
def test_policy_loss_bad_input(kwargs, error, pattern):
    lp, old, _, mask, adv = tiny_batch()
    args = dict(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask)
    args.update(kwargs)
    args = {k: mx.array(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    with pytest.raises(error, match=pattern):
        rl.policy_loss(**args)


# ---------------------------------------------------------------- with a model


def tiny_model(seed=0, vocab_size=16):
    mx.random.seed(seed)
    model = ln.Model(ln.ModelArgs(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64))
    mx.eval(model.parameters())
    return model


def test_token_logprobs_match_a_numpy_log_softmax():
    model = tiny_model()
    tokens = mx.array([[1, 2, 3, 4, 5], [1, 2, 3, 6, 7]])
    got = rl.token_logprobs(model, tokens)
    logits = np.array(model(tokens[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    want = np.take_along_axis(logp, np.array(tokens)[:, 1:, None], axis=-1)[..., 0]
    assert got.shape == (2, 4)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


def test_one_update_moves_probability_toward_the_better_completion():
    model = tiny_model()
    # Same prompt [1, 2, 3], completions [4, 5] (reward 1) and [6, 7] (reward 0).
    tokens = mx.array([[1, 2, 3, 4, 5], [1, 2, 3, 6, 7]])
    mask = mx.array([[False, False, True, True]] * 2)
    advantages = rl.group_advantages([1.0, 0.0], 2)

    def completion_logprob():
        return (rl.token_logprobs(model, tokens) * mask).sum(axis=1)

    def loss_fn(model):
        logprobs = rl.token_logprobs(model, tokens)
        return rl.policy_loss(logprobs, None, advantages, mask)[0]

    before = np.array(completion_logprob())
    _, grads = nn.value_and_grad(model, loss_fn)(model)
    mlx_optim.SGD(learning_rate=0.05).update(model, grads)
    after = np.array(completion_logprob())
    assert after[0] > before[0] and after[1] < before[1]


# ---------------------------------------------------------------- shipped tasks


@pytest.mark.parametrize("name, fields", [
    ("reverse", {"prompt", "answer"}), ("add", {"prompt", "answer"}),
    ("add1", {"prompt", "answer"}), ("bookends", {"prompt", "first", "last"})])
def test_task_prompts_are_deterministic_from_the_seed(name, fields):
    a = rl.tasks.make_prompts(name, 40, seed=1)
    assert a == rl.tasks.make_prompts(name, 40, seed=1)
    assert a != rl.tasks.make_prompts(name, 40, seed=2)
    assert len(a) == 40 and all(set(r) == fields for r in a)


def test_reverse_answers_are_the_reversed_word():
    for record in rl.tasks.make_prompts("reverse", 50, seed=0):
        word = record["prompt"].removeprefix("reverse ").removesuffix(" =")
        assert word.isalpha() and 3 <= len(word) <= 6
        assert record["answer"] == word[::-1]


@pytest.mark.parametrize("name, largest", [("add", 99), ("add1", 9)])
def test_add_answers_are_the_sum(name, largest):
    operands = set()
    for record in rl.tasks.make_prompts(name, 300, seed=0):
        a, b = record["prompt"].removesuffix("=").split("+")
        assert record["answer"] == str(int(a) + int(b))
        operands |= {int(a), int(b)}
    assert min(operands) == 0 and max(operands) == largest


def test_add1_holds_out_16_of_its_100_prompts():
    # crc32 of the prompt, mod 10, is 0 for these (computed by hand with zlib).
    held_out = {"0+0=", "0+8=", "1+7=", "2+1=", "2+3=", "2+7=", "3+0=", "3+8=", "4+1=", "4+3=",
                "4+7=", "5+2=", "7+3=", "7+7=", "7+9=", "9+8="}
    test = {r["prompt"] for r in rl.tasks.make_prompts("add1", 400, seed=0, split="test")}
    train = {r["prompt"] for r in rl.tasks.make_prompts("add1", 2000, seed=0)}
    assert test == held_out and len(train) == 84 and not train & test


@pytest.mark.parametrize("name", ["reverse", "add", "bookends"])
def test_train_and_test_prompts_are_disjoint(name):
    train = {r["prompt"] for r in rl.tasks.make_prompts(name, 300, seed=0, split="train")}
    test = {r["prompt"] for r in rl.tasks.make_prompts(name, 300, seed=0, split="test")}
    assert len(test) > (10 if name == "bookends" else 100) and not train & test


@pytest.mark.parametrize("completion, reward", [
    (" dcba", 1.0), ("dcba\nreverse xyz = zyx", 1.0), ("  dcba  \n", 1.0),
    (" dcxa", 0.75), (" dcbaa", 0.8), (" abcd", 0.0), ("", 0.0), ("\ndcba", 0.0), (" dc", 0.5),
])
def test_answer_match_scores_the_first_line_by_position(completion, reward):
    assert rl.tasks.answer_match("reverse abcd =", completion, answer="dcba") == reward


@pytest.mark.parametrize("name", ["reverse", "add", "add1"])
def test_a_demonstration_earns_the_full_reward(name):
    for record in rl.tasks.make_prompts(name, 10, seed=3):
        text = rl.tasks.demonstration(record)
        assert text.startswith(record["prompt"])
        completion = text[len(record["prompt"]):]
        reward = rl.tasks.answer_match(record["prompt"], completion, answer=record["answer"])
        assert reward == 1.0


def test_demonstrations_of_answer_tasks_are_their_answers():
    records = rl.tasks.make_prompts("add", 20, seed=4)
    assert rl.tasks.demonstrations("add", 20, seed=4) == [
        f"{r['prompt']} {r['answer']}\n" for r in records]


# ---------------------------------------------------------------- bookends


def corpus_word_counts():
    from mlx_localnorm.data.corpus import load_corpus
    return Counter(w for text in load_corpus().train for w in re.findall(r"[A-Za-z]+", text)
                   if w.islower())


def test_bookends_words_are_frequent_lowercase_words_of_3_to_7_letters():
    words = rl.tasks.word_list()
    counts = corpus_word_counts()
    assert list(words) == sorted(set(words)) and len(words) > 1000
    assert all(w.isalpha() and w.islower() and 3 <= len(w) <= 7 for w in words)
    assert all(counts[w] >= 30 for w in words)
    # every word written in lowercase that often is in (none dropped), names are not
    assert {w for w, c in counts.items() if c >= 30 and 3 <= len(w) <= 7} == set(words)
    assert {"love", "sweet", "king", "night"} <= set(words)
    assert not {"romeo", "hamlet", "falstaff", "of", "o"} & set(words)


def test_bookends_asks_only_for_letter_pairs_with_two_or_more_words():
    words = rl.tasks.word_list()
    pairs = {(r["first"], r["last"]) for r in rl.tasks.make_prompts("bookends", 3000, seed=0)}
    assert pairs <= set(rl.tasks.bookend_pairs())
    assert len(pairs) > 150
    for first, last in rl.tasks.bookend_pairs():
        assert sum(w[0] == first and w[-1] == last for w in words) >= 2
    for r in rl.tasks.make_prompts("bookends", 20, seed=1):
        assert r["prompt"] == f"{r['first']}..{r['last']} ="


@pytest.mark.parametrize("completion, first, last, reward", [
    (" sweet", "s", "t", 1.0), (" spirit\ns..t = sweet", "s", "t", 1.0), ("  sweet \n", "s", "t", 1.0),
    (" heart", "h", "t", 1.0), (" sweet", "s", "x", 0.75), (" sorrow", "s", "t", 0.75),
    (" sxxxt", "s", "t", 0.5), (" s", "s", "t", 0.5), (" sweet sweet", "s", "t", 0.5),
    (" heart", "s", "t", 0.0), (" Sweet", "s", "t", 0.0), ("", "s", "t", 0.0),
    ("\nsweet", "s", "t", 0.0),
])
def test_bookends_match_gates_on_the_first_letter_then_the_word_then_the_last(
        completion, first, last, reward):
    assert rl.tasks.bookends_match(f"{first}..{last} =", completion, first=first,
                                   last=last) == reward


@pytest.mark.parametrize("first, last", [("st", "t"), ("S", "t"), ("s", 1), ("s", "")])
def test_bookends_match_rejects_letters_that_are_not_one_lowercase_letter(first, last):
    with pytest.raises(TypeError, match=r"bookends_match: (first|last) must be one lowercase"):
        rl.tasks.bookends_match("word s-t =", " sweet", first=first, last=last)


def test_one_bookends_warmup_word_in_five_fits_the_rest_are_random_list_words():
    words = set(rl.tasks.word_list())
    texts = rl.tasks.demonstrations("bookends", 4000, seed=0)
    records = rl.tasks.make_prompts("bookends", 4000, seed=0)
    fits = firsts = 0
    for text, r in zip(texts, records):
        prompt, _, word = text.rstrip("\n").rpartition(" ")
        assert prompt == r["prompt"] and word in words and text.endswith("\n")
        fits += word[0] == r["first"] and word[-1] == r["last"]
        firsts += word[0] == r["first"]
    # 0.2 fit by design; a random list word fits both letters about 1 time in 200 and the
    # first one about 1 time in 15 (sd of the shares at n = 4000: under 0.007).
    assert 0.18 < fits / len(texts) < 0.23 and 0.22 < firsts / len(texts) < 0.28
    assert texts == rl.tasks.demonstrations("bookends", 4000, seed=0)


@pytest.mark.parametrize("task, reward", [("reverse", "answer_match"), ("add", "answer_match"),
                                          ("add1", "answer_match"),
                                          ("bookends", "bookends_match")])
def test_each_task_has_its_reward(task, reward):
    assert rl.tasks.task_reward(task) is getattr(rl.tasks, reward)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: rl.tasks.task_reward("sort"), ValueError, r"task.*'bookends'.*'sort'"),
    (lambda: rl.tasks.make_prompts("sort", 5), ValueError, r"task.*'reverse', 'add', 'add1'.*'sort'"),
    (lambda: rl.tasks.make_prompts("add", 0), ValueError, r"n must be a positive int.*got 0"),
    (lambda: rl.tasks.make_prompts("add", 5, split="val"), ValueError,
     r"split.*'train', 'test'.*'val'"),
    (lambda: rl.tasks.make_prompts("add", 5, seed=1.5), TypeError, r"seed.*int.*got 1.5"),
])
def test_make_prompts_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# ---------------------------------------------------------------- reward functions


def length_reward(prompt, completion, **fields):
    return float(len(completion))


def raising_reward(prompt, completion, **fields):
    raise KeyError("boom")


RECORDS = [{"prompt": "reverse abcd =", "answer": "dcba"}, {"prompt": "1+2=", "answer": "3"}]


def test_score_completions_passes_fields_and_returns_floats():
    got = rl.score_completions(rl.tasks.answer_match, RECORDS, [" dcba", " 4"])
    assert got == [1.0, 0.0] and all(type(v) is float for v in got)
    seen = []

    def spy(prompt, completion, **fields):
        seen.append((prompt, completion, fields))
        return True

    assert rl.score_completions(spy, RECORDS, ["x", "y"]) == [1.0, 1.0]
    assert seen == [("reverse abcd =", "x", {"answer": "dcba"}), ("1+2=", "y", {"answer": "3"})]


def test_a_reward_that_raises_names_the_prompt_and_the_function():
    with pytest.raises(rl.RewardError, match=r"test_rl:raising_reward raised KeyError: 'boom'"
                                              r".*prompt '1\+2='") as info:
        rl.score_completions(rl.combine_rewards([length_reward, raising_reward]),
                             RECORDS[1:], ["x"])
    assert isinstance(info.value, ValueError) and isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("value, error, pattern", [
    (float("nan"), ValueError, r"returned nan.*finite"),
    (float("-inf"), ValueError, r"returned -inf.*finite"),
    ("1.0", TypeError, r"returned '1.0'.*number"),
    (None, TypeError, r"returned None.*number"),
    (mx.array(1.0), TypeError, r"returned array.*number"),
])
def test_a_reward_must_return_a_finite_number(value, error, pattern):
    def bad(prompt, completion, **fields):
        return value

    with pytest.raises(error, match=r"reward .*bad " + pattern + r".*prompt 'reverse abcd ='"
                       ) as info:
        rl.score_completions(bad, RECORDS, ["x", "y"])
    assert isinstance(info.value, rl.RewardError)  # what a trainer reports as a user error


def test_numpy_and_int_rewards_are_accepted():
    values = iter([np.float32(0.5), 2])
    assert rl.score_completions(lambda p, c, **f: next(values), RECORDS, ["a", "b"]) == [0.5, 2.0]


def test_combined_rewards_are_the_weighted_sum():
    combined = rl.combine_rewards([rl.tasks.answer_match, length_reward], weights=[2.0, -0.5])
    assert combined("reverse abcd =", " dcxa", answer="dcba") == 2.0 * 0.75 - 0.5 * 5
    assert rl.combine_rewards([length_reward])("p", "abc") == 3.0


@pytest.mark.parametrize("args, error, pattern", [
    (([],), ValueError, r"functions.*at least one.*got \[\]"),
    (([length_reward, "x"],), TypeError, r"functions\[1\].*callable.*got 'x'"),
    (([length_reward], [1.0, 2.0]), ValueError, r"weights.*1 number.*got 2"),
    (([length_reward], [float("nan")]), ValueError, r"weights\[0\].*finite.*got nan"),
])
def test_combine_rewards_bad_input(args, error, pattern):
    with pytest.raises(error, match=pattern):
        rl.combine_rewards(*args)


def test_score_completions_bad_input():
    with pytest.raises(ValueError, match=r"completions.*2 \(one per record\).*got 1"):
        rl.score_completions(length_reward, RECORDS, ["x"])
    with pytest.raises(TypeError, match=r"reward.*callable.*got 3"):
        rl.score_completions(3, RECORDS, ["x", "y"])


# ---------------------------------------------------------------- loading rewards and prompts


def test_load_reward_from_a_module_and_from_a_file(tmp_path):
    assert rl.load_reward("mlx_localnorm.rl.tasks:answer_match") is rl.tasks.answer_match
    path = tmp_path / "my_rewards.py"
    path.write_text("def short(prompt, completion, **fields):\n    return -len(completion)\n")
    short = rl.load_reward(f"{path}:short")
    assert short("p", "abcd") == -4


@pytest.mark.parametrize("spec, error, pattern", [
    ("json", ValueError, r"MODULE:FUNCTION.*got 'json'"),
    ("json:", ValueError, r"MODULE:FUNCTION.*got 'json:'"),
    ("no_such_module_xyz:f", ValueError, r"'no_such_module_xyz:f'.*cannot import.*no_such_module"),
    ("json:no_such_fn", ValueError, r"'json:no_such_fn'.*json.*no attribute 'no_such_fn'"),
    ("json:__name__", TypeError, r"'json:__name__'.*not callable.*str"),
    ("/no/such/file.py:f", ValueError, r"cannot import.*/no/such/file.py"),
    (3, TypeError, r"spec.*MODULE:FUNCTION.*got 3"),
])
def test_load_reward_bad_specs(spec, error, pattern):
    with pytest.raises(error, match=pattern):
        rl.load_reward(spec)


def test_load_reward_names_the_spec_when_the_module_fails(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import no_such_dependency_xyz\n")
    with pytest.raises(ValueError, match=r"broken.py:f.*cannot import.*no_such_dependency_xyz"):
        rl.load_reward(f"{path}:f")


def test_load_prompts_reads_records_with_their_fields(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "1+2=", "answer": "3"}\n\n{"prompt": "x", "tags": [1]}\n')
    assert rl.load_prompts(path) == [{"prompt": "1+2=", "answer": "3"},
                                     {"prompt": "x", "tags": [1]}]


@pytest.mark.parametrize("text, error, pattern", [
    ('{"prompt": "a"}\n{"prompt": "b"\n', ValueError, r"prompts.jsonl:2: not a JSON object"),
    ('{"prompt": "a"}\n\n["b"]\n', ValueError, r"prompts.jsonl:3: .*\"prompt\" field.*list"),
    ('{"text": "a"}\n', ValueError, r"prompts.jsonl:1: .*\"prompt\" field.*\['text'\]"),
    ('{"prompt": 3}\n', TypeError, r"prompts.jsonl:1: \"prompt\" must be a string, got int"),
    ('{"prompt": "a", "completion": "b"}\n', ValueError,
     r"prompts.jsonl:1: .*\"completion\" is reserved"),
    ('\n\n', ValueError, r"prompts.jsonl: no prompts"),
    (b'{"prompt": "caf\xe9"}', ValueError, r"prompts.jsonl: not UTF-8"),
])
def test_load_prompts_names_file_and_line(tmp_path, text, error, pattern):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(error, match=pattern):
        rl.load_prompts(path)


# ---------------------------------------------------------------- batched rollouts

PROMPTS = [[1, 2, 4], [5], [7, 8, 9, 10]]


def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sampled_rollout(model, seed=4, **kw):
    mx.random.seed(seed)
    return rl.rollout(model, PROMPTS, 3, max_tokens=5, stop_tokens=[3], **kw)


def test_rollout_lays_out_groups_prompts_completions_and_masks():
    out = sampled_rollout(tiny_model())
    assert out.tokens.shape[0] == 9 and out.mask.shape == out.logprobs.shape
    assert out.mask.shape == (9, out.tokens.shape[1] - 1)
    assert set(out.finish_reasons) == {"stop", "length"}
    tokens, mask = np.array(out.tokens), np.array(out.mask)
    for row, (completion, reason) in enumerate(zip(out.completions, out.finish_reasons)):
        prompt = PROMPTS[row // 3]
        n, p = len(completion), len(prompt)
        assert tokens[row, :p].tolist() == prompt and tokens[row, p:p + n].tolist() == completion
        assert np.all(tokens[row, p + n:] == 0)
        assert 3 not in completion[:-1] and 1 <= n <= 5
        assert reason == ("stop" if completion[-1] == 3 else "length")
        assert reason == "stop" or n == 5
        assert np.flatnonzero(mask[row]).tolist() == list(range(p - 1, p - 1 + n))
    assert any(len(set(map(tuple, out.completions[i:i + 3]))) > 1 for i in (0, 3, 6))


def sliding_model():
    """Sliding-window attention (window 3) next to full attention: rotating KV caches."""
    mx.random.seed(0)
    model = ln.Model(ln.ModelArgs(vocab_size=16, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, sliding_window=3,
                                  layer_types=["sliding_attention", "full_attention"]))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("make_model", [tiny_model, sliding_model])
def test_rollout_logprobs_match_a_forward_pass_of_each_sequence(make_model):
    model = make_model()
    out = sampled_rollout(model)
    logprobs, mask = np.array(out.logprobs), np.array(out.mask)
    for row, completion in enumerate(out.completions):
        seq = PROMPTS[row // 3] + completion
        logp = np_log_softmax(model(mx.array([seq[:-1]]))[0])
        want = logp[np.arange(len(seq) - 1), seq[1:]][len(seq) - 1 - len(completion):]
        np.testing.assert_allclose(logprobs[row][mask[row]], want, rtol=1e-4, atol=1e-4)
        assert np.all(logprobs[row][~mask[row]] == 0.0)


class CallRecorder:
    """A model that records the shape of every input it is called with."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __call__(self, inputs, cache=None):
        self.shapes.append(tuple(inputs.shape))
        return self.model(inputs, cache=cache)

    def make_cache(self):
        return self.model.make_cache()


def test_all_completions_of_all_prompts_decode_in_one_batch():
    recorder = CallRecorder(tiny_model())
    sampled_rollout(recorder)
    assert max(batch for batch, length in recorder.shapes if length == 1) == 9


def test_each_prompt_is_prefilled_once_for_its_whole_group():
    recorder = CallRecorder(tiny_model())
    sampled_rollout(recorder)
    # Prefixes [1, 2] and [7, 8, 9] (the last prompt token starts the decode; [5] has none).
    assert sorted(shape for shape in recorder.shapes if shape[1] > 1) == [(1, 2), (1, 3)]


def test_rollout_is_reproducible_from_the_seed():
    model = tiny_model()
    a, b = sampled_rollout(model), sampled_rollout(model)
    assert a.completions == b.completions
    assert sampled_rollout(model, seed=5).completions != a.completions


def test_greedy_rollout_matches_a_step_by_step_greedy_decode():
    from mlx_lm.sample_utils import make_sampler

    model = tiny_model(seed=1)
    out = rl.rollout(model, PROMPTS, 2, max_tokens=6, stop_tokens=[3],
                     sampler=make_sampler(temp=0.0))
    for i, prompt in enumerate(PROMPTS):
        seq, want = list(prompt), []
        while len(want) < 6 and 3 not in want:
            logits = np.array(model(mx.array([seq]))[0, -1])
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] > 1e-3  # no near-tie for BLAS rounding to flip
            want.append(int(np.argmax(logits)))
            seq.append(want[-1])
        assert out.completions[2 * i] == want and out.completions[2 * i + 1] == want


def test_rollout_logprobs_are_the_old_policy_of_policy_loss():
    # Right after sampling, pi = pi_old: ratio 1 everywhere, nothing clipped.
    model = tiny_model()
    out = sampled_rollout(model)
    _, metrics = rl.policy_loss(rl.token_logprobs(model, out.tokens), out.logprobs,
                                mx.ones(9), out.mask, eps_low=1e-3)
    assert abs(metrics["ratio_mean"].item() - 1) < 1e-4
    assert metrics["clip_fraction"].item() == 0.0
    assert metrics["tokens"].item() == sum(map(len, out.completions))


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(group_size=1), ValueError, r"group_size.*>= 2.*got 1"),
    (dict(prompts=[]), ValueError, r"prompts.*non-empty.*got \[\]"),
    (dict(prompts=[[1], []]), ValueError, r"prompts\[1\].*non-empty.*got \[\]"),
    (dict(prompts=[[1, 2.0]]), ValueError, r"prompts\[0\].*token ids.*got \[1, 2.0\]"),
    (dict(max_tokens=0), ValueError, r"max_tokens.*positive int.*got 0"),
])
def test_rollout_bad_input(kwargs, error, pattern):
    args = dict(prompts=PROMPTS, group_size=2, max_tokens=4) | kwargs
    with pytest.raises(error, match=pattern):
        rl.rollout(tiny_model(), args.pop("prompts"), args.pop("group_size"), **args)


# ---------------------------------------------------------------- LoRA reference


def lora_model(use_dora=False):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = tiny_model(seed=2, vocab_size=32)
    base_logits = np.array(model(mx.array([[1, 2, 3, 4]])))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0}, use_dora=use_dora)
    return model, base_logits


def train_a_few_steps(model, steps=3):
    tokens = mx.array([[1, 2, 3, 4, 5], [1, 2, 3, 6, 7]])
    mask = mx.array([[False, False, True, True]] * 2)
    opt = mlx_optim.Adam(learning_rate=0.05)
    loss_and_grad = nn.value_and_grad(model, lambda m: rl.policy_loss(
        rl.token_logprobs(m, tokens), None, mx.array([1.0, -1.0]), mask)[0])
    for _ in range(steps):
        _, grads = loss_and_grad(model)
        opt.update(model, grads)
        mx.eval(model.parameters())


@pytest.mark.parametrize("use_dora", [False, True])
def test_the_reference_with_adapters_off_is_unchanged_by_training(use_dora):
    model, base_logits = lora_model(use_dora)
    inputs = mx.array([[1, 2, 3, 4]])
    train_a_few_steps(model)
    trained = np.array(model(inputs))
    assert np.abs(trained - base_logits).max() > 1e-2
    with rl.adapters_off(model):
        np.testing.assert_array_equal(np.array(model(inputs)), base_logits)
    np.testing.assert_array_equal(np.array(model(inputs)), trained)
    assert len(dict(tree_flatten(model.trainable_parameters()))) > 0


def test_adapters_come_back_after_an_error():
    model, _ = lora_model()
    train_a_few_steps(model, steps=1)
    trained = np.array(model(mx.array([[1, 2, 3, 4]])))
    with pytest.raises(KeyError):
        with rl.adapters_off(model):
            raise KeyError("inside")
    np.testing.assert_array_equal(np.array(model(mx.array([[1, 2, 3, 4]]))), trained)


def test_adapters_off_needs_adapters():
    with pytest.raises(ValueError, match=r"adapters_off.*no LoRA/DoRA adapters.*frozen copy"):
        with rl.adapters_off(tiny_model()):
            pass


# ---------------------------------------------------------------- one GRPO step


class CharTokenizer:
    """Token i is CHARS[i]; token 0 (newline) ends a completion."""

    chars = "\nabcdefgh"
    eos_token_ids = [0]

    def encode(self, text):
        return [self.chars.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


CHAR_RECORDS = [{"prompt": p, "answer": "aaaa"} for p in ("bc", "de", "fg", "h")]


def share_of_a(prompt, completion, **fields):
    return completion.count("a") / 4


def char_model(seed=0):
    mx.random.seed(seed)
    model = ln.Model(ln.ModelArgs(vocab_size=9, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64))
    mx.eval(model.parameters())
    return model


def params_of(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_grpo_steps_raise_the_reward():
    def rewards(learning_rate):
        model, opt = char_model(), mlx_optim.Adam(learning_rate=learning_rate)
        options = rl.GRPOOptions(group_size=8, max_tokens=4)
        return [rl.grpo_step(model, opt, CharTokenizer(), CHAR_RECORDS, share_of_a, options)[
            "reward_mean"] for _ in range(10)]

    trained, control = rewards(1e-2), rewards(0.0)
    assert min(trained[-3:]) > 0.9 and max(control) < 0.5, (trained, control)


def test_grpo_step_metrics():
    model, opt = char_model(), mlx_optim.SGD(learning_rate=0.0)
    mx.random.seed(1)
    m = rl.grpo_step(model, opt, CharTokenizer(), CHAR_RECORDS, share_of_a,
                     rl.GRPOOptions(group_size=4, max_tokens=4))
    assert set(m) == {"reward_mean", "reward_std", "completion_length",
                      "completion_length_std", "generated_tokens", "tokens_per_second",
                      "groups_kept", "loss", "clip_fraction", "ratio_mean", "grad_norm"}
    assert m["groups_kept"] == 4 and 1 <= m["completion_length"] <= 4
    mx.random.seed(1)  # the same draws again: the step's rollout comes first
    lengths = [len(c) for c in rl.rollout(
        model, [CharTokenizer().encode(r["prompt"]) for r in CHAR_RECORDS], 4, max_tokens=4,
        stop_tokens=[0]).completions]
    assert m["completion_length"] == np.mean(lengths)
    assert m["completion_length_std"] == pytest.approx(np.std(lengths), abs=1e-12)
    assert m["generated_tokens"] == 16 * m["completion_length"] and m["tokens_per_second"] > 0
    assert m["ratio_mean"] == 1.0 and m["clip_fraction"] == 0.0


def test_grpo_step_scores_the_text_without_the_stop_token():
    seen = []

    def spy(prompt, completion, **fields):
        seen.append(completion)
        return 0.0

    mx.random.seed(2)
    rl.grpo_step(char_model(), mlx_optim.SGD(learning_rate=0.0), CharTokenizer(),
                 CHAR_RECORDS, spy, rl.GRPOOptions(group_size=4, max_tokens=6))
    assert len(seen) == 16 and all("\n" not in text and len(text) <= 6 for text in seen)
    assert any(len(text) < 6 for text in seen)  # some completions stopped


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3, 1e6])
def test_grpo_step_clips_the_update_to_grad_clip_and_logs_the_norm_before(grad_clip):
    def step(clip):
        model = char_model()
        before = params_of(model)
        mx.random.seed(4)
        m = rl.grpo_step(model, mlx_optim.SGD(learning_rate=1.0), CharTokenizer(), CHAR_RECORDS,
                         share_of_a, rl.GRPOOptions(group_size=4, max_tokens=4, grad_clip=clip))
        after = params_of(model)
        # With SGD at rate 1 the parameters move by exactly the (clipped) gradient.
        delta = np.concatenate([(before[k] - after[k]).astype(np.float64).ravel()
                                for k in sorted(before)])
        return m, delta

    _, free_delta = step(0.0)
    m, delta = step(grad_clip)
    full_norm = np.linalg.norm(free_delta)
    assert full_norm > 1e-2 and m["grad_norm"] == pytest.approx(full_norm, rel=1e-4)
    expected = free_delta * min(1.0, grad_clip / full_norm) if grad_clip else free_delta
    np.testing.assert_allclose(delta, expected, rtol=1e-3, atol=1e-7)


def test_dapo_step_skips_groups_with_equal_rewards():
    model = char_model()
    before = params_of(model)
    options = rl.GRPOOptions.preset("dapo", group_size=4, max_tokens=3)
    m = rl.grpo_step(model, mlx_optim.SGD(learning_rate=1.0), CharTokenizer(), CHAR_RECORDS,
                     lambda p, c, **f: 1.0, options)
    assert m["groups_kept"] == 0 and "loss" not in m
    after = params_of(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_several_updates_keep_the_old_log_probs_of_the_rollout():
    # A huge step moves the policy: the second update sees a ratio far from 1 and clips.
    options = rl.GRPOOptions(group_size=4, max_tokens=4, eps_low=1e-3, updates=2)
    mx.random.seed(3)
    m = rl.grpo_step(char_model(), mlx_optim.SGD(learning_rate=50.0), CharTokenizer(),
                     CHAR_RECORDS, share_of_a, options)
    assert m["clip_fraction"] > 0.2 and m["ratio_mean"] != 1.0
    mx.random.seed(3)
    m = rl.grpo_step(char_model(), mlx_optim.SGD(learning_rate=50.0), CharTokenizer(),
                     CHAR_RECORDS, share_of_a, rl.GRPOOptions(group_size=4, max_tokens=4,
                                                              eps_low=1e-3))
    assert m["clip_fraction"] == 0.0


def test_kl_to_the_adapters_off_reference_starts_at_zero():
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = char_model()
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    opt = mlx_optim.Adam(learning_rate=1e-2)
    options = rl.GRPOOptions(group_size=8, max_tokens=4, beta=0.04)
    kls = [rl.grpo_step(model, opt, CharTokenizer(), CHAR_RECORDS, share_of_a, options)["kl"]
           for _ in range(3)]
    assert kls[0] == 0.0 and kls[-1] > 0.0


@pytest.fixture
def modes(monkeypatch):
    """(pass, model.training) for every rollout and log-prob pass of grpo_step/evaluate."""
    from mlx_localnorm.rl import step

    seen = []

    def spy(name):
        original = getattr(step, name)

        def recorded(model, *args, **kwargs):
            seen.append((name, model.training))
            return original(model, *args, **kwargs)

        monkeypatch.setattr(step, name, recorded)

    for name in ("rollout", "token_logprobs", "complete"):
        spy(name)
    return seen


def dropout_lora_model():
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = char_model()
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.5})
    return model


@pytest.mark.parametrize("training", [False, True])
def test_grpo_step_samples_in_eval_mode_and_updates_in_train_mode(modes, training):
    # mlx_lm.load returns a model in eval mode: LoRA dropout must still act in the updates,
    # and never in the rollout or the reference/old log-probs.
    model = dropout_lora_model()
    model.train(training)
    rl.grpo_step(model, mlx_optim.Adam(learning_rate=1e-2), CharTokenizer(), CHAR_RECORDS,
                 share_of_a, rl.GRPOOptions(group_size=2, max_tokens=3, beta=0.1, updates=2))
    assert modes == [("rollout", False), ("token_logprobs", False), ("token_logprobs", False),
                     ("token_logprobs", True), ("token_logprobs", True)]
    assert all(m.training == training for _, m in model.named_modules())


@pytest.mark.parametrize("training", [False, True])
def test_evaluate_runs_in_eval_mode(modes, training):
    model = dropout_lora_model()
    model.train(training)
    rl.evaluate(model, CharTokenizer(), CHAR_RECORDS, share_of_a, max_tokens=3)
    assert modes == [("complete", False)]
    assert all(m.training == training for _, m in model.named_modules())


def test_grpo_step_restores_the_mode_after_an_error():
    model = dropout_lora_model()

    def broken(prompt, completion, **fields):
        raise KeyError("broken")

    with pytest.raises(rl.RewardError):
        rl.grpo_step(model, mlx_optim.SGD(learning_rate=0.1), CharTokenizer(), CHAR_RECORDS,
                     broken, rl.GRPOOptions(group_size=2, max_tokens=2))
    assert model.training


def test_kl_needs_a_reference():
    with pytest.raises(ValueError, match=r"adapters_off.*no LoRA/DoRA adapters"):
        rl.grpo_step(char_model(), mlx_optim.SGD(learning_rate=0.1), CharTokenizer(),
                     CHAR_RECORDS, share_of_a, rl.GRPOOptions(group_size=2, beta=0.1))


def test_an_explicit_reference_model_gives_the_kl():
    model, reference = char_model(seed=0), char_model(seed=1)
    m = rl.grpo_step(model, mlx_optim.SGD(learning_rate=0.0), CharTokenizer(), CHAR_RECORDS,
                     share_of_a, rl.GRPOOptions(group_size=2, max_tokens=3, beta=0.1),
                     reference=reference)
    assert m["kl"] > 0.0


def test_presets_follow_the_papers():
    assert rl.GRPOOptions.preset("grpo").beta == 0.04
    dr = rl.GRPOOptions.preset("dr_grpo")
    assert (dr.advantage, dr.normalize, dr.beta) == ("dr_grpo", "constant", 0.0)
    dapo = rl.GRPOOptions.preset("dapo")
    assert (dapo.eps_low, dapo.eps_high, dapo.normalize, dapo.drop_equal_groups) == (
        0.2, 0.28, "token", True)
    gspo = rl.GRPOOptions.preset("gspo", group_size=4)
    assert (gspo.ratio, gspo.eps_low, gspo.eps_high, gspo.group_size) == (
        "sequence", 3e-4, 4e-4, 4)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(group_size=1), ValueError, r"GRPOOptions: group_size.*>= 2.*got 1"),
    (dict(max_tokens=0), ValueError, r"max_tokens.*positive int.*got 0"),
    (dict(temperature=0.0), ValueError, r"temperature.*positive.*got 0.0"),
    (dict(advantage="ppo"), ValueError, r"advantage.*'grpo', 'dr_grpo', 'rloo'.*'ppo'"),
    (dict(ratio="seq"), ValueError, r"ratio.*'token', 'sequence'.*'seq'"),
    (dict(normalize="mean"), ValueError, r"normalize.*'mean'"),
    (dict(eps_high=-1.0), ValueError, r"eps_high.*>= 0.*got -1.0"),
    (dict(beta=float("nan")), ValueError, r"beta.*>= 0.*got nan"),
    (dict(updates=0), ValueError, r"updates.*positive int.*got 0"),
    (dict(grad_clip=-1.0), ValueError, r"grad_clip.*>= 0.*got -1.0"),
    (dict(drop_equal_groups="yes"), TypeError, r"drop_equal_groups.*True or False.*'yes'"),
])
def test_grpo_options_bad_input(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        rl.GRPOOptions(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"preset.*'grpo', 'dr_grpo', 'dapo', 'gspo'.*'ppo'"):
        rl.GRPOOptions.preset("ppo")


@pytest.fixture
def loss_calls(monkeypatch):
    """The arguments of every policy_loss call that grpo_step makes."""
    from mlx_localnorm.rl import step

    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return rl.policy_loss(*args, **kwargs)

    monkeypatch.setattr(step, "policy_loss", spy)
    return calls


def test_dr_grpo_step_normalizes_by_the_generation_budget(loss_calls):
    rl.grpo_step(char_model(), mlx_optim.SGD(learning_rate=0.0), CharTokenizer(), CHAR_RECORDS,
                 share_of_a, rl.GRPOOptions.preset("dr_grpo", group_size=2, max_tokens=3))
    assert loss_calls[0][1]["normalize"] == "constant" and loss_calls[0][1]["max_len"] == 3


def test_dapo_step_trains_on_the_informative_groups_only(loss_calls):
    def reward(prompt, completion, **fields):
        # Four random completions almost never share their character sum.
        return float(sum(map(ord, completion))) if prompt in ("bc", "de") else 0.5

    mx.random.seed(4)
    m = rl.grpo_step(char_model(), mlx_optim.SGD(learning_rate=0.0), CharTokenizer(),
                     CHAR_RECORDS, reward, rl.GRPOOptions.preset("dapo", group_size=4,
                                                                 max_tokens=4))
    assert m["groups_kept"] == 2
    (logprobs, _, advantages, mask), _ = loss_calls[0]
    assert logprobs.shape[0] == mask.shape[0] == advantages.shape[0] == 4 * m["groups_kept"]
    groups = np.array(advantages).reshape(-1, 4)
    assert np.all(np.abs(groups).max(axis=1) > 0)


def test_near_zero_temperature_samples_one_completion_per_prompt():
    mx.random.seed(5)
    m = rl.grpo_step(char_model(), mlx_optim.SGD(learning_rate=0.0), CharTokenizer(),
                     CHAR_RECORDS, share_of_a,
                     rl.GRPOOptions.preset("dapo", group_size=4, max_tokens=4,
                                           temperature=1e-4))
    assert m["groups_kept"] == 0


# ---------------------------------------------------------------- evaluation


def test_complete_is_one_greedy_completion_per_prompt():
    model = char_model(seed=3)
    texts = rl.complete(model, CharTokenizer(), ["bc", "h", "bc"], max_tokens=5)
    assert texts[0] == texts[2]
    for prompt, text in zip(["bc", "h"], texts):
        seq, want = CharTokenizer().encode(prompt), ""
        while len(want) < 5:
            logits = np.array(model(mx.array([seq]))[0, -1])
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] > 1e-3  # no near-tie for BLAS rounding to flip
            token = int(np.argmax(logits))
            if token == 0:
                break
            want += CharTokenizer.chars[token]
            seq.append(token)
        assert text == want


def test_evaluate_scores_greedy_completions():
    model = char_model(seed=3)
    texts = rl.complete(model, CharTokenizer(), [r["prompt"] for r in CHAR_RECORDS],
                        max_tokens=4)
    got = rl.evaluate(model, CharTokenizer(), CHAR_RECORDS, share_of_a, max_tokens=4)
    want = np.array([t.count("a") / 4 for t in texts])
    assert got == {"reward_mean": want.mean(), "reward_std": want.std()}


def test_evaluate_bad_records():
    with pytest.raises(ValueError, match=r"evaluate: records\[1\].*\"prompt\".*got 'bc'"):
        rl.evaluate(char_model(), CharTokenizer(), [{"prompt": "h"}, "bc"], share_of_a,
                    max_tokens=2)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(prompts=[]), ValueError, r"complete: prompts.*non-empty.*got \[\]"),
    (dict(prompts=["bc", 3]), TypeError, r"complete: prompts\[1\].*string.*got 3"),
    (dict(max_tokens=-1), ValueError, r"max_tokens.*positive int.*got -1"),
])
def test_complete_bad_input(kwargs, error, pattern):
    args = dict(prompts=["bc"], max_tokens=3) | kwargs
    with pytest.raises(error, match=pattern):
        rl.complete(char_model(), CharTokenizer(), args.pop("prompts"), **args)


@pytest.mark.parametrize("records, options, error, pattern", [
    ([], None, ValueError, r"grpo_step: records.*non-empty.*got \[\]"),
    ([{"answer": "a"}], None, ValueError, r"grpo_step: records\[0\].*\"prompt\".*got"),
    ([{"prompt": 3}], None, ValueError, r"grpo_step: records\[0\].*\"prompt\".*got"),
    (CHAR_RECORDS, {"group_size": 2}, TypeError, r"grpo_step: options.*GRPOOptions.*dict"),
])
def test_grpo_step_bad_input(records, options, error, pattern):
    options = options if options is not None else rl.GRPOOptions(group_size=2)
    with pytest.raises(error, match=pattern):
        rl.grpo_step(char_model(), mlx_optim.SGD(learning_rate=0.1), CharTokenizer(), records,
                     share_of_a, options)


@pytest.mark.parametrize("tokens, error, pattern", [
    ([[1, 2, 3]], TypeError, r"token_logprobs: tokens must be an mx.array.*got list"),
    (mx.array([1, 2, 3]), ValueError, r"tokens must be 2-D \[batch, length >= 2\].*\(3,\)"),
    (mx.array([[1], [2]]), ValueError, r"tokens must be 2-D \[batch, length >= 2\].*\(2, 1\)"),
    (mx.array([[1.0, 2.0]]), TypeError, r"tokens must hold integer token ids.*float32"),
])
def test_token_logprobs_bad_input(tokens, error, pattern):
    with pytest.raises(error, match=pattern):
        rl.token_logprobs(tiny_model(), tokens)
