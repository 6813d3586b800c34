"""Loss spikes: `train.on_spike=rollback` restores the last checkpoint and leaves out the data
that led to the spike, ending with the losses of a run that never had that data."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from conftest import REPO
from helpers import patched_train, train_losses

from flaxlm import spikes


def test_batch_indices_pass_over_the_left_out_ones():
    assert spikes.batch_index(0, []) == 0
    assert spikes.batch_index(7, []) == 7
    assert spikes.batch_index(3, [5, 6]) == 3
    assert spikes.batch_index(5, [5, 6]) == 7
    assert spikes.batch_index(6, [2, 5, 6]) == 9
    assert spikes.window(24, 20, [], whole=True) == [21, 22, 23, 24]
    assert spikes.window(24, 20, [], whole=False) == [24]
    # After an earlier window, step numbers and batch indices differ by its length.
    assert spikes.window(12, 10, [3, 4], whole=True) == [13, 14]


def test_the_stream_leaves_out_the_recorded_batches_from_a_restored_position():
    stream = spikes.BatchStream(iter(range(3, 100)), [5, 6, 9], step=2)
    # Step 2 trained on batch 2; the data iterator restored there yields batch 3 next.
    assert [next(stream) for _ in range(4)] == [3, 4, 7, 8]
    assert stream.index == 8


def _train(run_dir, corpus_cache, patch: str, *overrides: str) -> subprocess.CompletedProcess:
    patch = f"import numpy as np\nimport flaxlm.spikes as S\ndraw = S.BatchStream.__next__\n{patch}"
    cmd, env = patched_train(
        run_dir, corpus_cache, "train.steps=30", f"train.spike_factor={SPIKE_FACTOR}", *overrides,
        patch=patch,
    )  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# After 20 steps the running average lags the falling loss (5.14 against 4.4 at step 23), and an
# untrained token costs about ln(vocab) = 5.7: the poisoned batch is 1.11 x the average, the
# clean ones at most 0.95 x.
SPIKE_FACTOR = 1.06
# Batch 24 of the data stream is garbage: a token the text never has, over and over.
POISON = """
def poisoned(self):
    batch = draw(self)
    if self.index == 24:
        batch = dict(batch, tokens=np.full_like(batch["tokens"], 300))
    return batch
S.BatchStream.__next__ = poisoned
"""
# The oracle's data never had batches 21..24 (the window from the step-20 checkpoint on).
WITHOUT_WINDOW = """
def without(self):
    batch = draw(self)
    while self.index in (21, 22, 23, 24):
        batch = draw(self)
    return batch
S.BatchStream.__next__ = without
"""


@pytest.mark.slow
def test_rollback_ends_with_the_losses_of_a_run_without_the_bad_window(tmp_path, corpus_cache):
    rolled = tmp_path / "rollback"
    proc = _train(rolled, corpus_cache, POISON, "train.on_spike=rollback")
    oracle = tmp_path / "oracle"
    _train(oracle, corpus_cache, WITHOUT_WINDOW)

    records = [json.loads(line) for line in (rolled / "metrics.jsonl").read_text().splitlines()]
    spike = [r for r in records if "loss_spike" in r]
    assert [r["step"] for r in spike] == [24], spike
    skips = json.loads((rolled / "data_skips.json").read_text())
    assert skips["skipped_batches"] == [21, 22, 23, 24]
    assert skips["events"][0]["restored_step"] == 20
    assert "restored step 20" in proc.stderr
    got, want = train_losses(rolled), train_losses(oracle)
    print("rollback loss curve (steps 18..30):", {s: round(got[s], 5) for s in range(18, 31)})
    print("oracle loss curve   (steps 18..30):", {s: round(want[s], 5) for s in range(18, 31)})
    print("spike:", spike[0])
    assert sorted(got) == sorted(want) == list(range(1, 31))
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-6)
