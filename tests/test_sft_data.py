"""Fine-tuning data: JSONL formats, loss masks, length-bucketed batches, masked loss.

Token ids come from a word-level tokenizer built here (one word = one id) with a tiny chat
template, so every expected sequence and mask is written out by hand.
"""

from __future__ import annotations  # noqa: I001  (mlx_localnorm must load before mlx.core)

import json
import re
import warnings
from pathlib import Path

import mlx_localnorm as ln  # noqa: F401  (first: it swaps in a fast BLAS on Linux)
import mlx.core as mx
import numpy as np
import pytest

from mlx_localnorm.data import Example, SFTBatches, load_sft, masked_cross_entropy
from mlx_localnorm.data.sft import INSTRUCT_DIR, Keys, read_jsonl, tokenize_records

SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = "a b c d e f g h".split()
ID = {t: i for i, t in enumerate(SPECIAL + WORDS)}
UNK, BOS, EOS, USER, ASSISTANT, SYSTEM, END = range(7)
A, B, C, D, E, F, G, H = (ID[w] for w in WORDS)
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _wrapper(chat_template: str | None = TEMPLATE):
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", chat_template=chat_template)
    return TokenizerWrapper(hf)


@pytest.fixture(scope="module")
def chat_tok():
    return _wrapper()


@pytest.fixture(scope="module")
def plain_tok():
    return _wrapper(None)


def _write(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _msgs(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


CHAT = _msgs(("system", "h"), ("user", "a b"), ("assistant", "c"), ("user", "d"),
             ("assistant", "e f"))
# <|system|> h <|end|> <|user|> a b <|end|> <|assistant|> c <|end|> <|user|> d <|end|>
# <|assistant|> e f <|end|>: only the last assistant turn's content and <|end|> are targets.
CHAT_TOKENS = [SYSTEM, H, END, USER, A, B, END, ASSISTANT, C, END, USER, D, END,
               ASSISTANT, E, F, END]
CHAT_MASK = [0] * 14 + [1, 1, 1]


# ---------------------------------------------------------------- formats and masks


def _one(records, fmt, tok, **kw) -> tuple[list, list]:
    (example,) = tokenize_records(records, fmt, tok, **kw)
    assert example.tokens.dtype == np.int32 and example.mask.dtype == bool
    return example.tokens.tolist(), example.mask.astype(int).tolist()


@pytest.mark.parametrize("wrapped", [True, False], ids=["mlx_lm_wrapper", "transformers"])
def test_chat_masks_all_but_the_last_assistant_turn(chat_tok, wrapped):
    tok = chat_tok if wrapped else chat_tok._tokenizer
    assert _one([CHAT], "chat", tok) == (CHAT_TOKENS, CHAT_MASK)
    assert _one([CHAT], "chat", tok, mask_prompt=False) == (CHAT_TOKENS, [1] * 17)


def test_chat_tools_reach_the_template_in_the_prompt_too():
    tok = _wrapper("{% if tools %}<|system|> {% for t in tools %}{{ t['function']['name'] }} "
                   "{% endfor %}<|end|> {% endif %}" + TEMPLATE)
    record = {**_msgs(("user", "a"), ("assistant", "b")),
              "tools": [{"type": "function", "function": {"name": "g"}},
                        {"type": "function", "function": {"name": "h"}}]}
    assert _one([record], "chat", tok) == (
        [SYSTEM, G, H, END, USER, A, END, ASSISTANT, B, END], [0] * 8 + [1, 1])


def test_chat_ending_on_a_user_turn_trains_that_turn_as_mlx_lm(chat_tok):
    # mlx-lm: no generation prompt when the last message is not the assistant's.
    record = _msgs(("user", "a"), ("user", "b"))
    assert _one([record], "chat", chat_tok) == (
        [USER, A, END, USER, B, END], [0, 0, 0, 1, 1, 1])


def test_a_one_message_chat_is_all_trained(chat_tok):
    assert _one([_msgs(("assistant", "a"))], "chat", chat_tok) == (
        [ASSISTANT, A, END], [1, 1, 1])


def test_completions_with_a_chat_template(chat_tok):
    record = {"prompt": "a b", "completion": "c d"}
    assert _one([record], "completions", chat_tok) == (
        [USER, A, B, END, ASSISTANT, C, D, END], [0, 0, 0, 0, 0, 1, 1, 1])


def test_completions_without_a_chat_template_are_prompt_completion_eos(plain_tok):
    record = {"prompt": "a b", "completion": "c d"}
    assert _one([record], "completions", plain_tok) == (
        [BOS, A, B, C, D, EOS], [0, 0, 0, 1, 1, 1])
    assert _one([record], "completions", plain_tok, mask_prompt=False)[1] == [1] * 6


def test_text_gets_bos_and_one_eos(plain_tok):
    assert _one([{"text": "a b"}], "text", plain_tok) == ([BOS, A, B, EOS], [1] * 4)
    assert _one([{"text": "a </s>"}], "text", plain_tok)[0] == [BOS, A, EOS]


def test_custom_keys(plain_tok, tmp_path):
    keys = Keys(prompt="question", completion="answer")
    path = _write(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    data = load_sft(path, plain_tok, keys=keys)
    assert data.format == "completions"
    assert data.train[0].tokens.tolist() == [BOS, A, B, EOS]


def test_chat_without_a_template_is_a_clear_error(plain_tok, tmp_path):
    path = _write(tmp_path / "chat.jsonl", [CHAT])
    with pytest.raises(ValueError, match=r"chat\.jsonl: chat data needs a tokenizer with a "
                                         r"chat template"):
        load_sft(path, plain_tok)


def test_our_sentencepiece_tokenizer_and_its_mlx_lm_view_agree(tmp_path):
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    texts = ["the norm of a vector is the square root of its sum of squares"] * 50
    sp = ln.data.train_tokenizer(texts, tmp_path, vocab_size=300)
    wrapper = mlx_lm_load_tokenizer(tmp_path)
    records = [{"prompt": "What is a norm?", "completion": " the root of a sum"}]
    (from_sp,) = tokenize_records(records, "completions", sp)
    (from_wrapper,) = tokenize_records(records, "completions", wrapper)
    prompt = [sp.bos_id(), *sp.encode("What is a norm?")]
    expected = prompt + sp.encode(" the root of a sum") + [sp.eos_id()]
    assert from_sp.tokens.tolist() == from_wrapper.tokens.tolist() == expected
    assert from_sp.mask.tolist() == from_wrapper.mask.tolist() == (
        [False] * len(prompt) + [True] * (len(expected) - len(prompt)))
    (text,) = tokenize_records([{"text": "sum of squares"}], "text", sp)
    assert text.tokens.tolist() == [sp.bos_id(), *sp.encode("sum of squares"), sp.eos_id()]


def test_masks_match_mlx_lm_trainer_but_not_its_trailing_pad_target(chat_tok):
    """mlx-lm's default_loss trains on ``offset <= j <= length`` (target index j): the same
    prompt cut, plus the padding id after the last token (mlx-lm 0.32); ours stops at the
    last token."""
    from mlx_lm.tuner.datasets import ChatDataset
    from mlx_lm.tuner.trainer import iterate_batches

    records = [CHAT, _msgs(("user", "g"), ("assistant", "h a")), _msgs(("user", "a"),
                                                                      ("user", "b"))]
    dataset = ChatDataset(records, chat_tok, mask_prompt=True)
    for record, example in zip(records, tokenize_records(records, "chat", chat_tok)):
        batch, lengths = next(iterate_batches([dataset.process(record)], 1, 2048))
        offset, length = np.array(lengths)[0]
        steps = np.arange(1, batch.shape[1])
        theirs = (steps >= offset) & (steps <= length)
        _, targets, mask = next(SFTBatches([example], 1))
        n = length - 1
        assert np.array(targets)[0, :n].tolist() == np.array(batch)[0, 1:length].tolist()
        assert np.array(mask)[0, :n].tolist() == theirs[:n].astype(np.float32).tolist()
        assert np.array(mask)[0, n:].sum() == 0


# ---------------------------------------------------------------- files and bad input


def test_directory_with_splits_and_single_file(chat_tok, tmp_path):
    _write(tmp_path / "train.jsonl", [CHAT, CHAT])
    _write(tmp_path / "valid.jsonl", [CHAT])
    data = load_sft(tmp_path, chat_tok)
    assert (data.format, len(data.train), len(data.valid), data.test) == ("chat", 2, 1, None)
    assert data.valid[0].tokens.tolist() == CHAT_TOKENS
    single = load_sft(tmp_path / "valid.jsonl", chat_tok)
    assert (len(single.train), single.valid, single.test) == (1, None, None)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_sft(tmp_path / "missing", chat_tok)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no train.jsonl"):
        load_sft(tmp_path / "empty_dir", chat_tok)


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n\n')
    assert read_jsonl(path) == ("text", [{"text": "a"}, {"text": "b"}])


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], r"bad\.jsonl:2: not valid JSON"),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "c"}'],
         r"bad\.jsonl:2: a 'completions' record needs field 'completion'"),
        (['{"prompt": "a", "completion": "b"}', '{"completion": "c", "x": 1}'],
         r"bad\.jsonl:2: a 'completions' record needs field 'prompt'"),
        (['{"text": "a"}', '{"messages": [{"role": "user", "content": "a"}]}'],
         r"mixed formats: .*bad\.jsonl:2 is a 'chat' record but .*bad\.jsonl:1 is 'text'"),
        (['{"question": "a"}'], r"bad\.jsonl:1: unknown record format"),
        (['[1, 2]'], r"bad\.jsonl:1: expected a JSON object, got list"),
        (['{"text": 3}'], r"bad\.jsonl:1: field 'text' must be a string, got int"),
        (['{"text": "a"}', '{"text": ""}'], r"bad\.jsonl:2: field 'text' is empty"),
        (['{"messages": []}'], r"bad\.jsonl:1: field 'messages' must be a non-empty list"),
        (['{"messages": [{"role": "user"}]}'], r"bad\.jsonl:1: messages\[0\] needs field "
                                               r"'content'"),
        (['{"messages": [{"content": "a"}]}'], r"bad\.jsonl:1: messages\[0\] needs field 'role'"),
        (['{"messages": [{"role": "user", "content": "a"}], "tools": {}}'],
         r"bad\.jsonl:1: field 'tools' must be a list"),
        (['', ' '], r"bad\.jsonl: no records"),
    ],
)
def test_bad_records_name_file_line_and_field(chat_tok, tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_sft(path, chat_tok)


def test_splits_of_different_formats_are_refused(chat_tok, tmp_path):
    _write(tmp_path / "train.jsonl", [CHAT])
    _write(tmp_path / "valid.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match=r"mixed formats: .*valid\.jsonl is 'text' but "
                                         r".*train\.jsonl is 'chat'"):
        load_sft(tmp_path, chat_tok)


def test_bad_tokenizer(tmp_path):
    with pytest.raises(TypeError, match="tokenizer must be"):
        tokenize_records([{"text": "a"}], "text", object())
    with pytest.raises(ValueError, match=r"fmt=\.\.\.\) must be one of"):
        tokenize_records([{"text": "a"}], "txt", _wrapper())


# ---------------------------------------------------------------- batches


def _examples(lengths, prompt=2, seed=0) -> list[Example]:
    """Example k: tokens 1000*(k+1) + 0..n-1 (unique across examples, never 0 = padding)."""
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(lengths):
        tokens = (1000 * (k + 1) + np.arange(n)).astype(np.int32)
        mask = np.arange(n) >= min(prompt, n)
        mask[rng.random(n) < 0.1] = False  # arbitrary holes: the mask is copied, not rebuilt
        out.append(Example(tokens, mask))
    return out


def _epoch(batches: SFTBatches, epoch: int = 0) -> list[tuple[np.ndarray, ...]]:
    return [tuple(np.array(a) for a in b) for b in batches.epoch_batches(epoch)]


LENGTHS = [5, 37, 2, 64, 12, 70, 3, 33, 18, 9, 41, 7, 26, 2, 15, 50, 11, 29, 4]


@pytest.mark.parametrize("max_seq_len", [80, 36])
def test_every_example_once_per_epoch_aligned_and_unmixed(max_seq_len):
    examples = _examples(LENGTHS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = SFTBatches(examples, batch_size=4, max_seq_len=max_seq_len, pad_to=8,
                             window=2, seed=3)
    long = sum(n > max_seq_len + 1 for n in LENGTHS)
    assert [str(w.message) for w in caught] == (
        [f"SFTBatches: {long} of 19 examples are longer than max_seq_len + 1 = "
         f"{max_seq_len + 1} tokens and are truncated"] if long else [])
    assert batches.steps_per_epoch == 5  # ceil(19 / 4): the last batch has one empty row
    seen = {}
    for inputs, targets, mask in _epoch(batches, epoch=1):
        assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
        assert inputs.shape == targets.shape == mask.shape and inputs.shape[0] == 4
        width = inputs.shape[1]
        assert (width % 8 == 0 and width <= max_seq_len) or width == max_seq_len
        for row_in, row_t, row_m in zip(inputs, targets, mask):
            n = int((row_t != 0).sum())
            assert (row_t[n:] == 0).all() and (row_in[n:] == 0).all() and (row_m[n:] == 0).all()
            if n == 0:
                continue
            k = row_t[0] // 1000 - 1
            assert (row_t[:n] // 1000 - 1 == k).all()  # one example per row
            tokens, loss = examples[k]
            assert row_in[:n].tolist() == tokens[:n].tolist()
            assert row_t[:n].tolist() == tokens[1: n + 1].tolist()
            assert row_m[:n].tolist() == loss[1: n + 1].astype(np.float32).tolist()
            assert k not in seen
            seen[k] = n
    assert seen == {k: min(n - 1, max_seq_len) for k, n in enumerate(LENGTHS)}


def test_unshuffled_batches_are_sorted_by_length_hand_computed():
    # lengths 5 3 9 4 6 -> targets 4 2 8 3 5; sorted: examples 1 3 0 4 2
    batches = SFTBatches(_examples([5, 3, 9, 4, 6]), batch_size=2, shuffle=False, pad_to=4)
    rows = [[int(r[0]) // 1000 - 1 if r[0] else None for r in t]
            for _, t, _ in _epoch(batches)]
    widths = [t.shape[1] for _, t, _ in _epoch(batches)]
    assert rows == [[1, 3], [0, 4], [2, None]]
    assert widths == [4, 8, 8]
    # padding: (8 + 16 + 16 - (2 + 3 + 4 + 5 + 8)) / 40
    assert batches.padding_fraction() == pytest.approx(18 / 40)


def test_padding_fraction_matches_the_batches_and_bucketing_reduces_it():
    lengths = np.random.default_rng(1).integers(2, 200, size=300).tolist()
    examples = _examples(lengths)

    def measured(batches):
        pads = [(t == 0).sum() for _, t, _ in _epoch(batches, 2)]
        total = [t.size for _, t, _ in _epoch(batches, 2)]
        return sum(pads) / sum(total)

    bucketed = SFTBatches(examples, batch_size=8, max_seq_len=256, window=16, seed=5)
    unsorted = SFTBatches(examples, batch_size=8, max_seq_len=256, window=1, seed=5)
    assert bucketed.padding_fraction(2) == pytest.approx(measured(bucketed))
    assert unsorted.padding_fraction(2) == pytest.approx(measured(unsorted))
    assert bucketed.padding_fraction(2) < 0.5 * unsorted.padding_fraction(2)


def test_order_depends_on_seed_and_epoch_only():
    examples = _examples(LENGTHS)

    def firsts(seed, epoch):
        return [t[:, 0].tolist() for _, t, _ in _epoch(SFTBatches(examples, 4, seed=seed), epoch)]

    assert firsts(0, 0) == firsts(0, 0)
    assert firsts(0, 0) != firsts(0, 1)
    assert firsts(0, 0) != firsts(1, 0)


def test_resume_continues_exactly_across_an_epoch_boundary():
    examples = _examples(LENGTHS)
    reference = SFTBatches(examples, batch_size=4, seed=7, window=2)
    expected = [next(reference) for _ in range(13)]
    first = SFTBatches(examples, batch_size=4, seed=7, window=2)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    assert (state["epoch"], state["step"]) == (0, 3)
    resumed = SFTBatches(examples, batch_size=4, seed=0, window=2)
    next(resumed)  # a used iterator (seed 0's order cached) resumes as well
    resumed.load_state_dict(state)
    for want in expected[3:]:
        got = next(resumed)
        for a, b in zip(got, want):
            assert np.array_equal(np.array(a), np.array(b))
    assert (resumed.epoch, resumed.step) == (2, 3)


def test_resume_refuses_another_layout():
    examples = _examples(LENGTHS)
    state = SFTBatches(examples, batch_size=4, window=2).state_dict()
    for kwargs in ({"window": 3}, {"pad_to": 16}, {"batch_size": 2}, {"max_seq_len": 100}):
        other = SFTBatches(examples, **{"batch_size": 4, "window": 2, **kwargs})
        with pytest.raises(ValueError, match="load_state_dict"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="load_state_dict"):
        SFTBatches(examples[:-1], batch_size=4, window=2).load_state_dict(state)


def test_ranks_split_each_global_batch():
    examples = _examples(LENGTHS)
    whole = _epoch(SFTBatches(examples, batch_size=4, seed=2))
    shards = [_epoch(SFTBatches(examples, batch_size=4, seed=2, rank=r, world_size=2))
              for r in range(2)]
    for step, (_, targets, _) in enumerate(whole):
        rows = [row.tolist() for r in range(2) for row in shards[r][step][1]]
        assert [[t for t in row if t] for row in rows] == [
            [t for t in row if t] for row in targets.tolist()]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"examples": []}, ValueError, r"examples=\.\.\.\) must be a non-empty list"),
        ({"examples": [(np.zeros(3), np.zeros(3))]}, TypeError, "items must be Example"),
        ({"batch_size": 0}, ValueError, r"batch_size=\.\.\.\) must be a positive int, got 0"),
        ({"max_seq_len": 2.0}, ValueError, r"max_seq_len=\.\.\.\) must be a positive int"),
        ({"pad_to": -8}, ValueError, r"pad_to=\.\.\.\) must be a positive int, got -8"),
        ({"seed": -1}, ValueError, r"seed=\.\.\.\) must be a non-negative int, got -1"),
        ({"world_size": 3}, ValueError, r"batch_size=4\) must be divisible by world_size=3"),
        ({"rank": 2, "world_size": 2}, ValueError, r"rank=\.\.\.\) must be in \[0, world_size"),
    ],
)
def test_bad_batch_arguments(kwargs, error, message):
    args = {"examples": _examples([4, 5]), "batch_size": 4, **kwargs}
    with pytest.raises(error, match=message):
        SFTBatches(**args)


# ---------------------------------------------------------------- masked loss


def _np_masked_ce(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    z = logits.astype(np.float64)
    m = z.max(-1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return float((nll * mask).sum() / mask.sum())


def test_masked_cross_entropy_on_a_chat_example_excludes_the_prompt(chat_tok):
    data = tokenize_records([CHAT, _msgs(("user", "g"), ("assistant", "h a"))], "chat", chat_tok)
    _, targets, mask = next(SFTBatches(data, batch_size=2, shuffle=False, pad_to=8))
    targets_np, mask_np = np.array(targets), np.array(mask)
    # Hand count: 3 targets (e f <|end|>) in CHAT, 3 (h a <|end|>) in the short chat.
    assert mask_np.sum() == 6
    assert targets_np[1, 13:16].tolist() == [E, F, END] and mask_np[1, 13:16].tolist() == [1] * 3
    assert mask_np[1, :13].sum() == 0
    logits = np.random.default_rng(0).normal(0, 3, (*targets_np.shape, len(ID))).astype(
        np.float32)
    expected = _np_masked_ce(logits, targets_np, mask_np)
    got = masked_cross_entropy(mx.array(logits), targets, mask)
    assert got.dtype == mx.float32
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Changing the logits at prompt and padding positions does not move the loss.
    logits[mask_np == 0] += np.float32(5) * np.random.default_rng(1).normal(
        size=(int((mask_np == 0).sum()), len(ID))).astype(np.float32)
    assert float(masked_cross_entropy(mx.array(logits), targets, mask)) == pytest.approx(
        expected, rel=1e-5)


def test_masked_cross_entropy_bool_mask_empty_mask_and_shapes():
    logits = mx.array(np.random.default_rng(2).normal(size=(1, 3, 5)).astype(np.float32))
    targets = mx.array([[1, 2, 3]])
    mask = np.array([[True, False, True]])
    expected = _np_masked_ce(np.array(logits), np.array(targets), mask.astype(np.float64))
    assert float(masked_cross_entropy(logits, targets, mx.array(mask))) == pytest.approx(
        expected, rel=1e-5)
    assert float(masked_cross_entropy(logits, targets, mx.zeros((1, 3)))) == 0.0
    with pytest.raises(ValueError, match=r"expected logits \(B, T, V\).*mask \(1, 2\)"):
        masked_cross_entropy(logits, targets, mx.zeros((1, 2)))


# ---------------------------------------------------------------- the shipped instruction set


def _shipped() -> list[dict]:
    return [json.loads(line) for split in ("train", "valid")
            for line in (INSTRUCT_DIR / f"{split}.jsonl").read_text().splitlines()]


def test_shipped_files_are_what_the_script_builds(tmp_path):
    from mlx_localnorm.data.build_instruct import write

    counts = write(tmp_path)
    for split in ("train", "valid"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (
            INSTRUCT_DIR / f"{split}.jsonl").read_bytes(), f"rerun build_instruct ({split})"
    assert counts["train"] + counts["valid"] >= 300 and counts["valid"] >= 30
    train, valid = (read_jsonl(INSTRUCT_DIR / f"{s}.jsonl")[1] for s in ("train", "valid"))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in valid}


def _numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", text)]


def test_shipped_numeric_answers_are_right():
    """Recomputed here in float64 from the formulas (SPEC), parsed back from the text."""
    checked = 0
    for record in _shipped():
        q, a = record["prompt"], record["completion"]
        vec = re.search(r"\[([-\d., ]+)\]", q)
        x = np.array(_numbers(vec.group(1))) if vec else None
        if q.startswith("Q: What is RMSNorm("):
            want = x / np.sqrt((x**2).mean())
        elif q.startswith("Q: What is LayerNorm("):
            want = (x - x.mean()) / x.std()
        elif q.startswith("Q: What is DyT("):
            want = np.tanh(_numbers(q.split("alpha = ")[1])[0] * x)
        elif q.startswith("Q: What is L2Norm("):
            want = x / np.linalg.norm(x)
        elif "spectral scale" in q:
            m, n = _numbers(q)
            want = np.array([np.sqrt(max(1.0, m / n))])
        elif "Dr. GRPO advantages" in q:
            want = x - x.mean()
        else:
            continue
        got = np.array(_numbers(a.split(":")[-1] if ":" in a else a.split("=")[-1]))
        np.testing.assert_allclose(got, want, atol=6e-5, err_msg=q)
        checked += 1
    assert checked >= 100


def test_shipped_api_answers_run():
    for record in _shipped():
        call = re.search(r"ln\.make_norm\('(\w+)', (\d+)\), or ln\.(\w+)\(", record["completion"])
        if call:
            assert type(ln.make_norm(call.group(1), int(call.group(2)))).__name__ == call.group(3)
        placement = re.search(r"placement='(\w+)'", record["completion"])
        if placement:
            assert placement.group(1) in ln.PLACEMENTS


def test_shipped_set_loads_with_and_without_a_chat_template(chat_tok, tmp_path):
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    records = _shipped()
    sp = ln.data.train_tokenizer([r["prompt"] + r["completion"] for r in records], tmp_path,
                                 vocab_size=400)
    data = load_sft(INSTRUCT_DIR, mlx_lm_load_tokenizer(tmp_path))
    assert data.format == "completions" and len(data.train) + len(data.valid) == len(records)
    for example, record in zip(data.valid, read_jsonl(INSTRUCT_DIR / "valid.jsonl")[1]):
        answer = example.tokens[example.mask]
        assert answer[-1] == sp.eos_id()
        assert sp.decode(answer[:-1].tolist()) == record["completion"]
    templated = load_sft(INSTRUCT_DIR, chat_tok)
    first = templated.train[0].tokens.tolist()
    assert first[0] == USER and ASSISTANT in first and first[-1] == END


# ---------------------------------------------------------------- optional: chitchat-dataset


@pytest.fixture(scope="module")
def chitchat_raw():
    dataset = pytest.importorskip("chitchat_dataset", reason="optional: pip install "
                                  "chitchat-dataset")
    return list(dataset.Dataset().values())


def test_chitchat_records_one_per_reply_with_context(chitchat_raw):
    from mlx_localnorm.data.chitchat import chitchat_records

    splits = chitchat_records("chat", turns=4, limit=30)
    conversations = [[" ".join(u["text"] for u in m) for m in c["messages"]]
                     for c in chitchat_raw[:30]]
    replies = [m for c in conversations for m in c[1::2]]
    records = splits["train"] + splits["valid"]
    assert len(records) == len(replies) and len(splits["valid"]) < len(splits["train"])
    assert sorted(r["messages"][-1]["content"] for r in records) == sorted(replies)
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and len(roles) <= 4
    first = conversations[0]
    assert {"messages": [{"role": "user", "content": first[0]},
                         {"role": "assistant", "content": first[1]}]} in records
    assert {"messages": [{"role": r, "content": c} for r, c in zip(
        ["user", "assistant"] * 2, first[2:6])]} in records


def test_chitchat_completions_and_split_stability(chitchat_raw):
    from mlx_localnorm.data.chitchat import chitchat_records

    small, large = (chitchat_records("completions", limit=n) for n in (20, 40))
    for split in ("train", "valid"):
        assert large[split][: len(small[split])] == small[split]
    first = [" ".join(u["text"] for u in m) for m in chitchat_raw[0]["messages"]]
    with pytest.raises(ValueError, match=r"turns=\.\.\.\) must be an even int >= 2, got 3"):
        chitchat_records(turns=3)
    with pytest.raises(ValueError, match=r"fmt=\.\.\.\) must be 'chat' or 'completions'"):
        chitchat_records("text")
    assert {"prompt": f"User: {first[2]}\nAssistant: {first[3]}\nUser: {first[4]}\nAssistant:",
            "completion": first[5]} in small["train"] + small["valid"]


def test_load_chitchat_picks_the_format_from_the_tokenizer(chitchat_raw, chat_tok, plain_tok):
    from mlx_localnorm.data.chitchat import load_chitchat

    assert load_chitchat(chat_tok, limit=3).format == "chat"
    data = load_chitchat(plain_tok, limit=3, valid_percent=0)
    assert (data.format, data.valid) == ("completions", None) and data.train
