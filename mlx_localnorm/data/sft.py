"""Fine-tuning data: mlx-lm's JSONL formats -> (tokens, loss mask) examples -> padded batches.

Contract (the fine-tuning trainer relies on these names and meanings)::

    data = load_sft("data_dir_or_file.jsonl", tokenizer)   # SFTData(train, valid, test, format)
    batches = SFTBatches(data.train, batch_size=4, max_seq_len=512, seed=0)
    inputs, targets, mask = next(batches)        # int32, int32, float32 (b, T), T % pad_to == 0
    loss = masked_cross_entropy(model(inputs), targets, mask)   # mean over mask == 1
    batches.state_dict() / batches.load_state_dict(state)       # exact resume, as Batches

- ``tokenizer``: an mlx-lm ``TokenizerWrapper`` (what ``mlx_lm.load`` returns), a
  ``transformers`` tokenizer, or a ``sentencepiece.SentencePieceProcessor`` (``prepare_data``).
- Formats (mlx-lm's, detected from the first record; every record checked; one format per
  dataset): ``text`` ``{"text"}``, ``completions`` ``{"prompt", "completion"}``, ``chat``
  ``{"messages": [{"role", "content"}, ...], "tools"?}``. :class:`Keys` renames the fields
  (mlx-lm's ``text_feature``, ``prompt_feature``, ``completion_feature``, ``chat_feature``).
- :class:`Example` ``(tokens, mask)``: ``mask[j]`` says whether token ``j`` is a loss target
  (``mask[0]`` is never used: the first token is never predicted). With ``mask_prompt`` (the
  default) the prompt's mask is False, as mlx-lm's ``--mask-prompt``: ``completions``:
  everything before the completion; ``chat``: everything before the last message (the last
  assistant turn is trained, earlier turns are context; a one-message chat is all trained).
  ``text`` has no prompt.
- Rendering is mlx-lm's own (``mlx_lm.tuner.datasets``): ``chat`` and ``completions`` through
  the chat template (no EOS added: the template ends the turn), ``text`` as
  ``encode(text)`` + EOS. ``completions`` with a tokenizer without a chat template (ours)
  is ``encode(prompt) + encode(completion, no BOS) + [EOS]`` (encoded on its own, a
  sentencepiece completion starts with a space); ``chat`` without one is an error.
- ``INSTRUCT_DIR``: the shipped instruction set (370 ``completions`` about this package).
- Batches: length bucketing, not packing (one example per row: no attention across
  examples, positions start at 0, any mlx-lm model works without a segment mask).
  Targets are ``tokens[1:]``, inputs ``tokens[:-1]``, ``mask`` is ``Example.mask[1:]`` as
  float32, 0 on padding; an example longer than ``max_seq_len + 1`` tokens is truncated.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from .batches import Batches, check_layout

FORMATS = ("text", "completions", "chat")
SPLITS = ("train", "valid", "test")
# The shipped instruction set (``completions``; rebuilt by ``python -m
# mlx_localnorm.data.build_instruct``): ``load_sft(INSTRUCT_DIR, tokenizer)``.
INSTRUCT_DIR = Path(__file__).resolve().parent / "localnorm_instruct"


class Example(NamedTuple):
    """One tokenized example: int32 ``tokens`` and a bool ``mask`` (True: a loss target)."""

    tokens: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class SFTData:
    """The tokenized splits (``valid``/``test`` None when absent) and their common format."""

    train: list[Example]
    valid: list[Example] | None
    test: list[Example] | None
    format: str


@dataclass(frozen=True)
class Keys:
    """The record fields of each format (mlx-lm's ``*_feature`` options)."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


def load_sft(
    path: str | os.PathLike,
    tokenizer: Any,
    mask_prompt: bool = True,
    keys: Keys = Keys(),
) -> SFTData:
    """Read, check and tokenize a JSONL file (the train split) or a directory holding
    ``train.jsonl`` and optionally ``valid.jsonl`` / ``test.jsonl``.

    Raises:
        FileNotFoundError: no such file, or a directory without ``train.jsonl``.
        ValueError: a malformed line, a record missing its format's fields, mixed formats,
            an empty file, or ``chat`` data with a tokenizer that has no chat template.
    """
    path = Path(path)
    if path.is_dir():
        files = {s: path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").is_file()}
        if "train" not in files:
            raise FileNotFoundError(f"load_sft(path={str(path)!r}): no train.jsonl in it")
    elif path.is_file():
        files = {"train": path}
    else:
        raise FileNotFoundError(f"load_sft(path={str(path)!r}): no such file or directory")
    read = {split: read_jsonl(file, keys) for split, file in files.items()}
    fmt, first = read["train"][0], files["train"]
    for split, (other, _) in read.items():
        if other != fmt:
            raise ValueError(
                f"mixed formats: {files[split]} is '{other}' but {first} is '{fmt}'"
            )
    examples = {
        split: tokenize_records(records, fmt, tokenizer, mask_prompt, keys, source=files[split])
        for split, (_, records) in read.items()
    }
    return SFTData(examples["train"], examples.get("valid"), examples.get("test"), fmt)


def read_jsonl(path: str | os.PathLike, keys: Keys = Keys()) -> tuple[str, list[dict]]:
    """``(format, records)`` of a JSONL file, every record checked against the format of the
    first one. Blank lines are skipped. Errors name the file, the line and the field."""
    fmt, records = None, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if fmt is None:
                fmt = record_format(record, keys)
                if fmt is None:
                    raise ValueError(
                        f"{where}: unknown record format: expected a '{keys.text}', "
                        f"'{keys.prompt}'+'{keys.completion}' or '{keys.messages}' field, "
                        f"got keys {sorted(record)}"
                    )
                first = where
            _check_record(record, fmt, keys, where, first)
            records.append(record)
    if fmt is None:
        raise ValueError(f"{path}: no records (empty file)")
    return fmt, records


def record_format(record: dict, keys: Keys = Keys()) -> str | None:
    """The format a record's keys say, in mlx-lm's order of precedence, or None."""
    if keys.prompt in record and keys.completion in record:
        return "completions"
    if keys.messages in record:
        return "chat"
    if keys.text in record:
        return "text"
    return None


def _check_record(record: dict, fmt: str, keys: Keys, where: str, first: str) -> None:
    other = record_format(record, keys)
    if other not in (fmt, None):
        raise ValueError(f"mixed formats: {where} is a '{other}' record but {first} is '{fmt}'")
    fields = {
        "text": (keys.text,),
        "completions": (keys.prompt, keys.completion),
        "chat": (keys.messages,),
    }[fmt]
    for field in fields:
        if field not in record:
            raise ValueError(
                f"{where}: a '{fmt}' record needs field '{field}', got keys {sorted(record)}"
            )
        if fmt != "chat" and not isinstance(record[field], str):
            raise ValueError(
                f"{where}: field '{field}' must be a string, got {type(record[field]).__name__}"
            )
    if fmt == "text" and not record[keys.text]:
        raise ValueError(f"{where}: field '{keys.text}' is empty")
    if fmt == "chat":
        _check_messages(record[keys.messages], where, keys.messages)
        if not isinstance(record.get("tools", []), list):
            raise ValueError(f"{where}: field 'tools' must be a list")


def _check_messages(messages: Any, where: str, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field '{field}' must be a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: {field}[{i}] must be an object")
        for name in ("role", "content"):
            if name not in message:
                raise ValueError(f"{where}: {field}[{i}] needs field '{name}'")
        if not isinstance(message["role"], str):
            raise ValueError(f"{where}: {field}[{i}].role must be a string")


def tokenize_records(
    records: list[dict],
    fmt: str,
    tokenizer: Any,
    mask_prompt: bool = True,
    keys: Keys = Keys(),
    source: str | os.PathLike = "records",
) -> list[Example]:
    """Tokenize checked records of format ``fmt`` (see the module docstring for the rules)."""
    from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset

    if fmt not in FORMATS:
        raise ValueError(f"tokenize_records(fmt=...) must be one of {FORMATS}, got {fmt!r}")
    tokenizer = _as_hf_like(tokenizer)
    templated = has_chat_template(tokenizer)
    if fmt == "chat" and not templated:
        raise ValueError(
            f"{source}: chat data needs a tokenizer with a chat template, and this one has "
            f"none; use 'completions' or 'text' records, or a model whose tokenizer has one"
        )
    if fmt == "text":
        dataset = TextDataset(records, tokenizer, text_key=keys.text)
    elif fmt == "chat":
        dataset = ChatDataset(records, tokenizer, keys.messages, mask_prompt)
    elif templated:
        dataset = CompletionsDataset(
            records, tokenizer, keys.prompt, keys.completion, mask_prompt
        )
    else:
        dataset = _PlainCompletions(tokenizer, keys, mask_prompt)
    examples = []
    for record in tqdm(records, desc=f"tokenize {Path(source).name}", leave=False,
                       disable=len(records) < 1000):
        if fmt == "chat" and len(record[keys.messages]) == 1:
            # Nothing comes before the only message (mlx-lm would render an empty chat).
            tokens, offset = ChatDataset([], tokenizer, keys.messages).process(record)
        else:
            tokens, offset = dataset.process(record)
        tokens = np.asarray(tokens, np.int32)
        examples.append(Example(tokens, np.arange(len(tokens)) >= offset))
    return examples


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` renders chats (mlx-lm wrapper or ``transformers`` tokenizer)."""
    return bool(getattr(tokenizer, "has_chat_template", getattr(tokenizer, "chat_template", None)))


class _SentencePiece:
    """The slice of the ``transformers`` tokenizer API mlx-lm's datasets use, for our
    sentencepiece model: ``encode`` adds ``<s>`` as the run's ``tokenizer.json`` does."""

    chat_template = None

    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp, self.eos_token_id = sp, sp.eos_id()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.sp.bos_id(), *ids] if add_special_tokens else ids


def _as_hf_like(tokenizer: Any) -> Any:
    if isinstance(tokenizer, spm.SentencePieceProcessor):
        return _SentencePiece(tokenizer)
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(
            f"tokenizer must be an mlx_lm TokenizerWrapper, a transformers tokenizer or a "
            f"sentencepiece.SentencePieceProcessor, got {type(tokenizer).__name__}"
        )
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("tokenizer has no eos_token_id: fine-tuning examples end with EOS")
    return tokenizer


class _PlainCompletions:
    """``completions`` without a chat template: prompt, then completion, then EOS."""

    def __init__(self, tokenizer: Any, keys: Keys, mask_prompt: bool):
        self.tokenizer, self.keys, self.mask_prompt = tokenizer, keys, mask_prompt

    def process(self, record: dict) -> tuple[list[int], int]:
        prompt = list(self.tokenizer.encode(record[self.keys.prompt]))
        completion = self.tokenizer.encode(record[self.keys.completion], add_special_tokens=False)
        tokens = [*prompt, *completion, self.tokenizer.eos_token_id]
        return tokens, len(prompt) if self.mask_prompt else 0


class SFTBatches(Batches):
    """An endless iterator of ``(inputs, targets, mask)``: int32, int32 and float32
    ``mx.array`` of shape ``(batch_size // world_size, T)``, one example per row.

    Row ``i`` holds example ``k``'s ``tokens[:L]`` as inputs, ``tokens[1:L+1]`` as targets
    and ``mask[1:L+1]`` as mask, ``L = min(len(tokens) - 1, max_seq_len)``, then zeros.
    ``T`` is the longest ``L`` of the shard rounded up to a multiple of ``pad_to`` (at most
    ``max_seq_len``), as mlx-lm pads.

    Order (length bucketing): epoch ``e`` shuffles the examples as :class:`Batches` shuffles
    sequences (``argsort(PCG64([seed, e]).random_raw(N))``), cuts that order into windows of
    ``window * batch_size`` examples, sorts each window by length (stable) and cuts it into
    batches, then visits the batches in the order ``argsort(PCG64([seed, e, 1])
    .random_raw(steps_per_epoch))``. Every example is in exactly one batch per epoch:
    ``steps_per_epoch = ceil(N / batch_size)``, the last batch filled with empty rows
    (mask 0). ``shuffle=False`` (validation) keeps file order, then sorts windows.

    Sharding and resume as :class:`Batches` (``seq_len`` is ``max_seq_len`` and
    ``num_sequences`` the number of examples in the state).
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        max_seq_len: int = 2048,
        seed: int = 0,
        shuffle: bool = True,
        pad_to: int = 32,
        window: int = 64,
        rank: int = 0,
        world_size: int = 1,
    ):
        # Batches.__init__ wants a token stream; the checks and fields are set up here.
        _check_examples(examples)
        sizes = {"batch_size": batch_size, "max_seq_len": max_seq_len, "pad_to": pad_to,
                 "window": window}
        check_layout("SFTBatches", sizes, seed, rank, world_size)
        self.examples = examples
        self.batch_size, self.seq_len, self.seed, self.shuffle = (
            batch_size, max_seq_len, seed, shuffle)
        self.pad_to, self.window, self.rank, self.world_size = pad_to, window, rank, world_size
        self.num_sequences = len(examples)
        self.steps_per_epoch = math.ceil(len(examples) / batch_size)
        self.lengths = np.array([min(len(e.tokens) - 1, max_seq_len) for e in examples])
        self._trained = np.array([np.count_nonzero(e.mask[1: n + 1])  # loss targets per row
                                  for e, n in zip(examples, self.lengths)])
        self._bounds: dict[int, int] = {}
        self.epoch = self.step = 0
        self._order_epoch, self._order = -1, np.empty(0, np.int64)
        self._plan_key, self._plan = None, np.empty((0, batch_size), np.int64)
        long = sum(len(e.tokens) > max_seq_len + 1 for e in examples)
        if long:
            warnings.warn(
                f"SFTBatches: {long} of {len(examples)} examples are longer than "
                f"max_seq_len + 1 = {max_seq_len + 1} tokens and are truncated",
                stacklevel=2,
            )

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`Batches.state_dict`, plus ``pad_to`` and ``window``."""
        return {**super().state_dict(), "pad_to": self.pad_to, "window": self.window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the batch layout (window, padding) must be the same."""
        for key in ("pad_to", "window"):
            if isinstance(state, dict) and key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"SFTBatches.load_state_dict: state has {key}={state[key]!r} but these "
                    f"batches have {key}={getattr(self, key)!r}; resume with the same layout"
                )
        super().load_state_dict(state)

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of this rank's ``inputs`` positions in epoch ``epoch`` that are padding."""
        real = total = 0
        for step in range(self.steps_per_epoch):
            rows = self._rows(epoch, step)
            lengths = self._row_lengths(rows)
            real += int(lengths.sum())
            total += len(rows) * self._width(lengths)
        return 1.0 - real / total

    def trained_bound(self, width: int) -> int:
        """The most trained positions (mask != 0) a batch of ``width`` columns can hold on
        this rank: the sum of the ``batch_size // world_size`` largest counts among the
        examples that fit in ``width``. Fixed per width, so a loss that gathers the trained
        positions into this many rows compiles once per width, as the batch does."""
        if width not in self._bounds:  # a sort over all examples: once per width
            largest_first = np.sort(self._trained[self.lengths <= width])[::-1]
            self._bounds[width] = int(largest_first[: self.batch_size // self.world_size].sum())
        return self._bounds[width]

    def _plan_for(self, epoch: int) -> np.ndarray:
        """``(steps_per_epoch, batch_size)`` example indices of epoch ``epoch``, -1: empty."""
        if self._plan_key != (self.seed, epoch):
            order = self._order_for(epoch)
            size = self.window * self.batch_size
            windows = [order[i: i + size] for i in range(0, len(order), size)]
            bucketed = np.concatenate(
                [w[np.argsort(self.lengths[w], kind="stable")] for w in windows])
            plan = np.full(self.steps_per_epoch * self.batch_size, -1, np.int64)
            plan[: len(bucketed)] = bucketed
            plan = plan.reshape(self.steps_per_epoch, self.batch_size)
            if self.shuffle:
                keys = np.random.PCG64([self.seed, epoch, 1]).random_raw(len(plan))
                plan = plan[np.argsort(keys, kind="stable")]
            self._plan_key, self._plan = (self.seed, epoch), plan
        return self._plan

    def _rows(self, epoch: int, step: int) -> np.ndarray:
        shard = self.batch_size // self.world_size
        return self._plan_for(epoch)[step, self.rank * shard: (self.rank + 1) * shard]

    def _row_lengths(self, rows: np.ndarray) -> np.ndarray:
        return np.where(rows >= 0, self.lengths[rows], 0)

    def _width(self, lengths: np.ndarray) -> int:
        padded = self.pad_to * max(1, math.ceil(lengths.max() / self.pad_to))
        return min(padded, self.seq_len)

    def _batch(self, epoch: int, step: int) -> tuple[mx.array, mx.array, mx.array]:
        rows = self._rows(epoch, step)
        lengths = self._row_lengths(rows)
        shape = (len(rows), self._width(lengths))
        inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        mask = np.zeros(shape, np.float32)
        for i, (k, n) in enumerate(zip(rows, lengths)):
            if k >= 0:
                tokens, loss = self.examples[k]
                inputs[i, :n], targets[i, :n], mask[i, :n] = (
                    tokens[:n], tokens[1: n + 1], loss[1: n + 1])
        return mx.array(inputs), mx.array(targets), mx.array(mask)


def _check_examples(examples: Any) -> None:
    if not isinstance(examples, list) or not examples:
        raise ValueError(
            f"SFTBatches(examples=...) must be a non-empty list of Example, got "
            f"{type(examples).__name__}{'' if examples else ' (empty)'}"
        )
    if not all(isinstance(e, Example) and len(e.tokens) == len(e.mask) for e in examples):
        raise TypeError("SFTBatches(examples=...): items must be Example(tokens, mask) "
                        "of equal lengths (from load_sft / tokenize_records)")


def masked_cross_entropy(logits: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    r"""Mean next-token cross-entropy over the positions where ``mask`` is 1.

    .. math:: L = \frac{\sum_{b,t} m_{bt}\,(\log\sum_v e^{z_{btv}} - z_{b,t,y_{bt}})}
                       {\max(1, \sum_{b,t} m_{bt})}

    ``logits`` ``(B, T, V)``, ``targets`` ``(B, T)`` int, ``mask`` ``(B, T)`` (0/1 or bool).
    Summed in float32; an all-zero mask gives 0.
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(
            f"masked_cross_entropy: expected logits (B, T, V), targets and mask (B, T), got "
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    mask = mask.astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, targets).astype(mx.float32)
    return (ce * mask).sum() / mx.maximum(mask.sum(), 1.0)

