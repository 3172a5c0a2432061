"""Packed, shuffled, resumable, shardable batches of fixed-length sequences."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import numpy as np

from .tokens import TokenFile


class Batches:
    """An endless iterator of ``(inputs, targets)`` int32 ``mx.array`` pairs of shape
    ``(batch_size // world_size, seq_len)``.

    Packing: the token stream ``t`` (documents back to back, ``<s> ... </s>``) is cut into
    ``S = (len(t) - 1) // seq_len`` sequences; sequence ``i`` is
    ``t[i*seq_len : i*seq_len + seq_len + 1]``, its first ``seq_len`` tokens the inputs and
    its last ``seq_len`` the targets, so no token is a target twice in an epoch. Tokens past
    the last whole sequence are not used.

    Order: epoch ``e`` visits the sequences in the order
    ``argsort(np.random.PCG64([seed, e]).random_raw(S))`` (or ``0..S-1`` with
    ``shuffle=False``), ``batch_size`` at a time; the last ``S % batch_size`` of that order
    are skipped, and the next epoch starts.

    Sharding: ``batch_size`` is the global batch. Rank ``r`` of ``world_size`` gets rows
    ``[r*b, (r+1)*b)`` of every global batch, ``b = batch_size // world_size``, so the
    ranks' batches are disjoint and together are exactly the single-process batch.

    Resume: ``state_dict()`` is the position ``{"seed", "epoch", "step"}`` plus the layout
    it is valid for; it does not depend on the rank, so any rank's state resumes all ranks.

    Args:
        tokens: a :class:`TokenFile` or a 1-D integer NumPy array of token ids.
        batch_size: sequences per global batch (a multiple of ``world_size``).
        seq_len: tokens per input sequence.
        seed: shuffling seed.
        shuffle: ``False`` keeps file order (for validation).
        rank, world_size: this process' shard of each global batch.
    """

    def __init__(
        self,
        tokens: TokenFile | np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens = _token_array(tokens)
        check_layout("Batches", {"batch_size": batch_size, "seq_len": seq_len}, seed, rank,
                     world_size)
        self.batch_size, self.seq_len, self.seed, self.shuffle = batch_size, seq_len, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.num_sequences = max(len(self.tokens) - 1, 0) // seq_len
        self.steps_per_epoch = self.num_sequences // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"Batches: {len(self.tokens)} tokens make {self.num_sequences} sequences "
                f"of seq_len={seq_len} (+1 target), fewer than batch_size={batch_size}"
            )
        self.epoch = self.step = 0
        self._order_epoch, self._order = -1, np.empty(0, np.int64)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[mx.array, mx.array]:
        batch = self._batch(self.epoch, self.step)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def epoch_batches(self, epoch: int = 0, remainder: bool = False
                      ) -> Iterator[tuple[mx.array, mx.array]]:
        """All batches of one epoch, without moving the iterator (e.g. for validation).
        ``remainder=True`` (one process only) adds the ``S % batch_size`` sequences the
        epoch skips as a last, smaller batch, so every sequence is visited once."""
        if remainder and self.world_size != 1:
            raise ValueError(f"{type(self).__name__}.epoch_batches: remainder=True needs "
                             f"world_size=1, got world_size={self.world_size}")
        for step in range(self.steps_per_epoch):
            yield self._batch(epoch, step)
        if remainder:
            skipped = self._order_for(epoch)[self.steps_per_epoch * self.batch_size:]
            if len(skipped):
                yield self._sequences(skipped)

    def state_dict(self) -> dict[str, Any]:
        """The position (next batch to return) and the layout it applies to; JSON-serializable."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_sequences": self.num_sequences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from ``state_dict()``), which must match this layout."""
        expected = self.state_dict()
        if not isinstance(state, dict) or set(state) != set(expected):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"Batches.load_state_dict: expected keys {sorted(expected)}, got {got}"
            )
        for key in ("shuffle", "batch_size", "seq_len", "num_sequences"):
            if state[key] != expected[key]:
                raise ValueError(
                    f"Batches.load_state_dict: state has {key}={state[key]!r} but these "
                    f"batches have {key}={expected[key]!r}; resume with the same data "
                    f"and batch layout"
                )
        if (
            not isinstance(state["epoch"], int)
            or state["epoch"] < 0
            or not (isinstance(state["step"], int) and 0 <= state["step"] < self.steps_per_epoch)
        ):
            raise ValueError(
                f"Batches.load_state_dict: epoch={state['epoch']!r}, step={state['step']!r} "
                f"out of range (steps_per_epoch={self.steps_per_epoch})"
            )
        self.seed, self.epoch, self.step = state["seed"], state["epoch"], state["step"]
        self._order_epoch = -1  # the cached order may belong to another seed

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order_epoch = epoch
            # A BitGenerator's raw stream is stable across NumPy versions (Generator.permutation
            # is not guaranteed to be), so a run resumes with the same order after an upgrade.
            keys = np.random.PCG64([self.seed, epoch]).random_raw(self.num_sequences)
            self._order = (
                np.argsort(keys, kind="stable") if self.shuffle else np.arange(self.num_sequences)
            )
        return self._order

    def _batch(self, epoch: int, step: int) -> tuple[mx.array, mx.array]:
        shard = self.batch_size // self.world_size
        first = step * self.batch_size + self.rank * shard
        return self._sequences(self._order_for(epoch)[first : first + shard])

    def _sequences(self, indices: np.ndarray) -> tuple[mx.array, mx.array]:
        starts = indices * self.seq_len
        rows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)
        return mx.array(rows[:, :-1]), mx.array(rows[:, 1:])


def check_layout(
    owner: str, sizes: dict[str, Any], seed: Any, rank: Any, world_size: Any
) -> None:
    """The argument checks of a batch iterator: positive ``sizes`` (with ``batch_size``) and
    ``world_size``, a non-negative seed, ``0 <= rank < world_size`` dividing the batch."""
    for name, value in {**sizes, "world_size": world_size}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}({name}=...) must be a positive int, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{owner}(seed=...) must be a non-negative int, got {seed!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(
            f"{owner}(rank=...) must be in [0, world_size={world_size}), got {rank!r}"
        )
    if sizes["batch_size"] % world_size:
        raise ValueError(
            f"{owner}(batch_size={sizes['batch_size']}) must be divisible by "
            f"world_size={world_size}: it is the global batch, split across ranks"
        )


def _token_array(tokens: TokenFile | np.ndarray) -> np.ndarray:
    if isinstance(tokens, TokenFile):
        return tokens.tokens
    if (
        isinstance(tokens, np.ndarray)
        and tokens.ndim == 1
        and np.issubdtype(tokens.dtype, np.integer)
    ):
        return tokens
    raise TypeError(
        f"Batches(tokens=...) expects a TokenFile or a 1-D integer np.ndarray, got "
        f"{type(tokens).__name__}"
        + (
            f" of shape {tokens.shape} and dtype {tokens.dtype}"
            if isinstance(tokens, np.ndarray)
            else ""
        )
    )
