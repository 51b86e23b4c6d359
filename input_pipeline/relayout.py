"""Continuing a training data stream on another number of processes (elastic resume).

Each process p of P reads its own stream: its files (`files[p::P]` after the holdout), shuffled
per epoch by (seed, p, epoch). A checkpoint stores how far each process read (its position,
in raw records). Resuming on P' != P processes applies one rule:

1. **Finish what was started.** For each old process, the rest of every epoch that any old
   process had started is still owed: the unread part of its current epoch, and the whole of
   an epoch it had not reached yet while another process had (processes cross epoch boundaries
   a few steps apart). These remainders, each in its old process's own shuffled order, are laid
   end to end in old-process order and cut into P' contiguous parts of equal size (to one
   record): part q is the *prelude* of new process q. Each record owed is read exactly once.
2. **Then the new layout.** After its prelude, process q reads its own files `files[q::P']`,
   epoch after epoch, from the epoch after the last one started (the *base epoch*): a function
   of the seed and P' alone.

A run resumed again on the same P' rebuilds the same preludes (they are in the checkpoint) and
continues bit-exactly; resumed on yet another count, the unread parts of the preludes and of
the current epochs are owed in the same way. What is not exact: the order of the remaining
records of the interrupted epoch, and of the following epochs, depends on the new process count.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple


class StreamPiece(NamedTuple):
    """Raw records [start, stop) of epoch `epoch` of process `process_index`'s stream when the
    run had `process_count` processes."""
    process_count: int
    process_index: int
    epoch: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the processes of a run read: each its prelude, then its own files from `base_epoch`."""
    process_count: int
    base_epoch: int = 0
    preludes: tuple[tuple[StreamPiece, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.preludes:
            object.__setattr__(self, "preludes", ((),) * self.process_count)
        if len(self.preludes) != self.process_count:
            raise ValueError(f"a layout of {self.process_count} processes needs as many preludes, "
                             f"got {len(self.preludes)}")

    def prelude_length(self, process_index: int) -> int:
        return sum(piece.length for piece in self.preludes[process_index])

    def to_meta(self) -> dict[str, Any]:
        """JSON-able, as the checkpoint metadata stores it (`data_layout`)."""
        return {"process_count": self.process_count, "base_epoch": self.base_epoch,
                "preludes": [[list(piece) for piece in prelude] for prelude in self.preludes]}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "Layout":
        """The layout of a checkpoint's metadata; checkpoints written before layouts existed
        read their own files from epoch 0, one process per `data_positions` entry."""
        saved = meta.get("data_layout")
        if saved is None:
            return cls(len(meta["data_positions"]))
        return cls(int(saved["process_count"]), int(saved["base_epoch"]),
                   tuple(tuple(StreamPiece(*map(int, piece)) for piece in prelude)
                         for prelude in saved["preludes"]))


@dataclasses.dataclass(frozen=True)
class Relayout:
    """The new layout, and what the log says about it."""
    layout: Layout
    remaining: int         # records owed to the interrupted epoch(s): the preludes' total
    epoch_records: int     # records in one epoch (all old processes' streams together)
    epochs: tuple[int, ...]  # the epochs the remaining records belong to

    def describe(self) -> str:
        if not self.epochs:
            return f"the old processes were at an epoch boundary; epoch {self.layout.base_epoch} starts"
        if len(self.epochs) == 1:
            return (f"{self.remaining:,} of {self.epoch_records:,} records of epoch "
                    f"{self.epochs[0]} remain")
        return (f"{self.remaining:,} records of epochs {', '.join(map(str, self.epochs))} remain "
                f"({self.epoch_records:,} per epoch)")


def relayout(old: Layout, positions: Sequence[int], epoch_lengths: Sequence[int],
             new_count: int) -> Relayout:
    """The layout continuing `old` (its processes at `positions`, raw records per epoch of each
    old process's own files `epoch_lengths`) on `new_count` processes (see the module rule)."""
    count = old.process_count
    if len(positions) != count or len(epoch_lengths) != count:
        raise ValueError(f"{count} processes need {count} positions and epoch lengths, got "
                         f"{len(positions)} and {len(epoch_lengths)}")
    if new_count < 1:
        raise ValueError(f"new process count must be >= 1, got {new_count}")
    owed: list[list[StreamPiece]] = []
    started: list[int] = []  # per old process: the last epoch of its own files it has begun
    for p, (position, length) in enumerate(zip(positions, epoch_lengths)):
        if length < 1:
            raise ValueError(f"process {p}'s epoch length must be >= 1, got {length}")
        prelude_length = old.prelude_length(p)
        if position < prelude_length:  # still in its prelude: the rest of it is owed
            owed.append(_after(old.preludes[p], position))
            started.append(old.base_epoch - 1)
            continue
        epoch, offset = divmod(position - prelude_length, length)
        epoch += old.base_epoch
        owed.append([StreamPiece(count, p, epoch, offset, length)] if offset else [])
        started.append(epoch if offset else epoch - 1)
    base_epoch = max(started) + 1
    for p, length in enumerate(epoch_lengths):  # epochs another process began and p did not
        owed[p] += [StreamPiece(count, p, e, 0, length) for e in range(started[p] + 1, base_epoch)]
    pieces = [piece for process in owed for piece in process]
    total = sum(piece.length for piece in pieces)
    preludes = tuple(tuple(_between(pieces, q * total // new_count, (q + 1) * total // new_count))
                     for q in range(new_count))
    return Relayout(Layout(new_count, base_epoch, preludes), total, sum(epoch_lengths),
                    tuple(sorted({piece.epoch for piece in pieces})))


def _after(pieces: Sequence[StreamPiece], skip: int) -> list[StreamPiece]:
    """The pieces' records after the first `skip`."""
    return _between(pieces, skip, sum(piece.length for piece in pieces))


def _between(pieces: Sequence[StreamPiece], begin: int, end: int) -> list[StreamPiece]:
    """Records [begin, end) of the pieces laid end to end, as pieces."""
    out, offset = [], 0
    for piece in pieces:
        lo, hi = max(begin - offset, 0), min(end - offset, piece.length)
        if lo < hi:
            out.append(piece._replace(start=piece.start + lo, stop=piece.start + hi))
        offset += piece.length
    return out
