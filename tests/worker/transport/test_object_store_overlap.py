"""The object-store reduce-scatter overlapped with backward (issue 10): a worker sends a
shard its chunk of the block as soon as backward has produced every gradient in it, with the
bits of the finished block, and a shard's inbox hands the chunks over in block order. No Ray:
the replica and the inbox are plain objects here, as inside their actors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from chainrule.spec_file import load_job_spec
from scheduler.datasets import from_arrays, split_and_standardize
from worker.replica import ModelReplica, ReplicaSetup
from worker.resolved_job import resolve
from worker.transport.object_store import ChunkInbox, ChunkSender, ChunkSends, overlap_seconds

SPEC = """
name: overlap
model: {layers: [{linear: {out_features: 48}}, {relu: {}}, {linear: {out_features: 40}},
                 {relu: {}}, {linear: {out_features: 5}}]}
loss: cross_entropy
optimizer: {sgd: {lr: 0.1}}
data: {dataset: "upload:synthetic", batch_size: 48, epochs: 1, validation_fraction: 0.0}
seed: 3
"""


def _replica() -> ModelReplica:
    rng = np.random.default_rng(0)
    raw = from_arrays(rng.standard_normal((96, 32)), rng.integers(0, 5, 96))
    dataset = split_and_standardize(raw, 0.0, True, 3)
    job = resolve(load_job_spec(SPEC), dataset.shape)
    # No shared parameter vector: the object-store transport's replica.
    return ModelReplica(ReplicaSetup(job, None), dataset.training_rows(), owns_process=False)


@pytest.mark.parametrize("micro_batch_count", [1, 3])
def test_the_top_layers_chunk_leaves_before_backward_reaches_the_first_layer(
        micro_batch_count):
    replica = _replica()
    micro_batches = [(m, np.arange(m * 16, m * 16 + 16)) for m in range(micro_batch_count)]
    middle = replica.layout.slots[2].offset + 7  # inside the second layer's weight
    bounds = [(0, middle), (middle, replica.flat.size)]
    finished = np.empty_like(replica.flat)
    replica.compute(replica.layout.views(finished), micro_batches, 1, 48)

    block = np.empty_like(replica.flat)
    sent: list[tuple[int, np.ndarray, bool]] = []  # shard, chunk, first layer differentiated

    def send(k: int, chunk: np.ndarray) -> None:
        sent.append((k, chunk.copy(), replica.parameters[0].grad is not None))

    sender = ChunkSender(replica.layout, block, bounds, send)
    replica.compute(replica.layout.views(block), micro_batches, 1, 48, chunk_sender=sender)
    sender.finish()

    # Shard 1 holds the top layers: its chunk is sent while the first layer's gradient is
    # still to be computed; shard 0's needs the first layer, so it leaves last.
    assert [(k, first_layer_done) for k, _, first_layer_done in sent] == [(1, False),
                                                                          (0, True)]
    for k, chunk, _ in sent:
        lo, hi = bounds[k]
        assert chunk.tobytes() == finished[lo:hi].tobytes()  # the finished block's bits


def test_a_block_without_micro_batches_sends_zero_chunks_when_finished():
    replica = _replica()
    bounds = [(0, 100), (100, replica.flat.size)]
    block = np.empty_like(replica.flat)
    sent: list[tuple[int, np.ndarray]] = []
    sender = ChunkSender(replica.layout, block, bounds, lambda k, c: sent.append((k, c.copy())))
    replica.compute(replica.layout.views(block), [], 1, 48, chunk_sender=sender)
    assert sent == []
    sender.finish()
    assert [k for k, _ in sent] == [0, 1] and not any(c.any() for _, c in sent)


def test_the_inbox_gives_the_chunks_in_block_order_once_all_arrived_from_any_thread():
    inbox = ChunkInbox()
    chunks = {b: np.full(3, float(b)) for b in range(3)}
    inbox.accept(7, 2, chunks[2], None)
    late = threading.Timer(0.05, lambda: [inbox.accept(7, b, chunks[b], None) for b in (1, 0)])
    late.start()
    gradients, statistics, arrivals = inbox.take(7, 3, False, timeout_seconds=60)
    late.join()
    assert [g[0] for g in gradients] == [0.0, 1.0, 2.0] and statistics == []
    assert sorted(arrivals) == [0, 1, 2]


def test_a_recomputed_blocks_chunk_replaces_the_lost_workers_and_a_missing_one_times_out():
    inbox = ChunkInbox()
    inbox.accept(4, 0, np.zeros(2), None)
    inbox.accept(4, 0, np.ones(2), None)  # the same block again, from a survivor
    with pytest.raises(TimeoutError, match=r"blocks \[1\]"):
        inbox.take(4, 2, False, timeout_seconds=0.01)
    inbox.accept(4, 1, np.ones(2), None)
    gradients, _, _ = inbox.take(4, 2, False, timeout_seconds=60)
    assert [g.tolist() for g in gradients] == [[1.0, 1.0], [1.0, 1.0]]


def test_the_hidden_share_counts_only_what_travelled_while_the_sender_computed():
    # Block 0 sent shard 1's chunk at t=1 and finished computing at t=2; it arrived at t=3:
    # 2 s of communication, 1 of them hidden. Shard 0's chunk, sent at 2, arrived at 2.5.
    sends = [ChunkSends({0: 2.0, 1: 1.0}, computed_at=2.0)]
    communication, hidden = overlap_seconds(sends, [{0: 2.5}, {0: 3.0}])
    assert communication == pytest.approx(2.5) and hidden == pytest.approx(1.0)


def test_a_gradient_reported_final_twice_is_an_error_not_a_chunk_with_the_first_value():
    replica = _replica()
    block = np.zeros_like(replica.flat)
    sender = ChunkSender(replica.layout, block, [(0, block.size)], lambda k, c: None)
    sender.parameter_ready(0, np.ones(replica.parameters[0].shape, np.float32))
    with pytest.raises(RuntimeError, match="final twice"):
        sender.parameter_ready(0, np.ones(replica.parameters[0].shape, np.float32))
