"""Elastic resume: a checkpoint written by P processes continues on P' != P, each record of the
interrupted epoch trained exactly once (input_pipeline/relayout.py, docs/scaling.md)."""
import collections
import itertools
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from checkpoints.orbax_io import restore_params
from input_pipeline import relayout
from tests.conftest import REPO
from tests.training.conftest import (
    SHARDS,
    TINY_STEPS,
    copy_run,
    launch,
    process_env,
    tiny_train_args,
)

SEED = 3  # tests/tiny_config.py's


# ---- the rule alone, on abstract streams: a record is (old layout, process, epoch, offset) ----

def _records(piece: relayout.StreamPiece) -> list[tuple[int, int, int]]:
    """Records of a piece, named by (own process count's file set, epoch, offset): process p of
    P reads files p::P, so a record is fixed by (P, p, epoch, offset)."""
    return [(piece.process_count, piece.process_index, piece.epoch, i)
            for i in range(piece.start, piece.stop)]


def _read(layout: relayout.Layout, q: int, stop: int, length: int) -> list[tuple]:
    """Records [0, stop) of process q under `layout` (own epochs `length` records long)."""
    out = [r for piece in layout.preludes[q] for r in _records(piece)][:stop]
    position = len(out)
    epoch = layout.base_epoch
    while position < stop:
        take = min(length, stop - position)
        out += _records(relayout.StreamPiece(layout.process_count, q, epoch, 0, take))
        position += take
        epoch += 1
    return out


def test_relayout_owes_every_started_epoch_exactly_once():
    """A chain of resumes on 2 -> 3 -> 1 -> 2 -> 3 processes, each interrupted at uneven
    positions (mid-prelude, at an epoch boundary, across one): after each, the records read so far
    plus those owed (the preludes) hold every epoch before the new layout's own exactly once,
    each epoch read from the streams of one layout (the one that began it)."""
    def lengths(count: int) -> list[int]:  # 101 records dealt to `count` processes
        return [len(range(p, 101, count)) for p in range(count)]

    layout = relayout.Layout(2)
    read: list[tuple] = []
    chain = ((3, [60, 0]), (1, [5, 50, 34]), (2, [230]), (3, [51, 100]))
    for new_count, positions in chain:
        old_lengths = lengths(layout.process_count)
        for q, stop in enumerate(positions):
            read += _read(layout, q, stop, old_lengths[q])
        moved = relayout.relayout(layout, positions, old_lengths, new_count)
        owed = [r for prelude in moved.layout.preludes for piece in prelude for r in _records(piece)]
        assert len(owed) == moved.remaining
        sizes = [moved.layout.prelude_length(q) for q in range(new_count)]
        assert max(sizes) - min(sizes) <= 1  # the owed records are split evenly
        assert moved.layout.base_epoch >= layout.base_epoch
        for epoch in range(moved.layout.base_epoch):
            records = [r for r in read + owed if r[2] == epoch]
            assert len(records) == len(set(records)) == 101, (new_count, epoch)
            assert len({r[0] for r in records}) == 1  # one layout's streams
        assert not [r for r in read if r[2] >= moved.layout.base_epoch]
        layout = moved.layout
    assert layout.base_epoch == 6


def test_relayout_at_an_epoch_boundary_owes_nothing():
    moved = relayout.relayout(relayout.Layout(2), [10, 12], [10, 12], 1)
    assert moved.remaining == 0 and moved.layout.base_epoch == 1
    assert moved.layout.preludes == ((),)
    assert "epoch boundary" in moved.describe()


def test_layout_round_trips_through_checkpoint_metadata():
    moved = relayout.relayout(relayout.Layout(2), [7, 3], [10, 9], 3)
    meta = json.loads(json.dumps({"data_positions": [0, 0, 0],
                                  "data_layout": moved.layout.to_meta()}))
    assert relayout.Layout.from_meta(meta) == moved.layout
    assert relayout.Layout.from_meta({"data_positions": [1, 2]}) == relayout.Layout(2)


# ---- real processes: 2 processes x 2 devices -> 1 process x 4 devices -> 2 x 1 ----

def _train(workdir: Path, total_steps: int, processes: int, devices: int, *extra: str
           ) -> subprocess.CompletedProcess:
    args = tiny_train_args(workdir, f"--config.total_steps={total_steps}",
                           "--config.eval_every_steps=0", "--config.checkpoint_every_steps=100",
                           *extra)
    if processes > 1:
        command, env = launch(str(REPO / "train.py"), *args, processes=processes, devices=devices), process_env()
    else:
        command, env = [sys.executable, str(REPO / "train.py"), *args], process_env(devices=devices)
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _meta(workdir: Path, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def _trained(meta: dict, since: list[int] | None = None) -> list[tuple[str, int, int]]:
    """(file, record, epoch) of the raw records every process consumed under the checkpoint's
    layout, from `since` (the positions this layout started from) to the checkpoint."""
    from input_pipeline import pipeline  # late: TensorFlow, for the record auditing only
    from input_pipeline.data_source import parse_input
    from tests.tiny_config import get_config

    config = parse_input(get_config(SHARDS).input)
    layout = relayout.Layout.from_meta(meta)
    positions = meta["data_positions"]
    since = since or [0] * len(positions)
    return list(itertools.chain.from_iterable(
        pipeline.stream_records(config, seed=SEED, process_index=q,
                                process_count=layout.process_count, start=since[q],
                                stop=positions[q], layout=layout)
        for q in range(layout.process_count)))


def test_resume_on_another_number_of_processes_trains_each_record_once(tmp_path, two_process_run):
    # The shared 2-process x 2-device run (global batch 8, 12 steps) goes on with 1 x 4, then 2 x 1.
    workdir = copy_run(two_process_run[0], tmp_path / "run")
    first = _meta(workdir, TINY_STEPS)
    assert first["devices"] == [2, 2]

    shrunk = _train(workdir, 20, 1, 4)
    second = _meta(workdir, 20)
    line = next(l for l in shrunk.stderr.splitlines() if f"resumed step {TINY_STEPS} written by" in l)
    # 12 steps of 8 records (and any bad records skipped on the way) of the 129 of epoch 0
    remaining = 129 - sum(first["data_positions"])
    assert ("written by 2 processes x 2 devices on 1 process x 4 devices; "
            f"{remaining} of 129 records of epoch 0 remain; then epoch 1 over 1 process") in line, line
    assert relayout.Layout.from_meta(second).base_epoch == 1

    grown = _train(workdir, 40, 2, 1, "--config.batch_size=16")  # and a larger global batch
    third = _meta(workdir, 40)
    assert any("written by 1 process x 4 devices on 2 processes x 1 device" in l
               for l in grown.stderr.splitlines()), grown.stderr[-3000:]
    assert "batch size changed on resume: 8 (checkpoint) -> 16 (this run)" in grown.stderr
    assert (workdir / "config.20.json").exists() and third["batch_size"] == 16

    trained = _trained(first) + _trained(second) + _trained(third)
    # the 129 training records (16 of the 145 are the holdout), each once in epochs 0 and 1
    for epoch in (0, 1):
        counts = collections.Counter((path, record) for path, record, e in trained if e == epoch)
        assert len(counts) == 129 and set(counts.values()) == {1}, (epoch, counts.most_common(3))
    assert any(e == 2 for _, _, e in trained)  # the 1 -> 2 run went on into its own epochs
    assert (sum(second["skipped_records"]) >= sum(first["skipped_records"])
            and sum(third["skipped_records"]) >= sum(second["skipped_records"]))

    params, _ = restore_params(str(workdir / "checkpoints" / "40"))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
