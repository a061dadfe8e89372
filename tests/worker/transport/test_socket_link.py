"""A link (worker/transport/socket_link.py) over a real loopback connection: arrays larger than
the kernel's buffers arrive whole, with their bits, in order, in the receiver's own arrays; a
peer that closes is reported at once on both the receiving and the sending side."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from worker.transport.direct import Message, Op
from worker.transport.socket_link import Link, LinkClosed, connect, listen


def _pair() -> tuple[Link, Link]:
    """Both ends of one TCP connection on loopback."""
    server = listen("127.0.0.1")
    left = connect(server.getsockname()[:2], 30.0)
    right, _ = server.accept()
    server.close()
    return Link(left, "left"), Link(right, "right")


def test_large_arrays_arrive_whole_in_order_in_the_receivers_arrays():
    sender, receiver = _pair()
    rng = np.random.default_rng(0)
    arrays: list[np.ndarray] = [rng.standard_normal(3_000_000).astype(np.float32),
                                rng.standard_normal(5)]
    sender.send(Message(Op.CHUNK, 7, 1, arrays[0].nbytes, arrays[1].nbytes), *arrays)
    sender.send(Message(Op.SLICE, 8, 0, 0))
    header = receiver.receive_header(Message)
    assert header == Message(Op.CHUNK, 7, 1, arrays[0].nbytes, arrays[1].nbytes)
    received = [np.empty_like(arrays[0]), np.empty_like(arrays[1])]
    for array in received:
        receiver.receive_into(array)
    sender.flush(30.0)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(arrays, received))
    assert receiver.receive_header(Message).op == Op.SLICE


def test_a_closed_peer_is_reported_to_a_reader_and_to_a_sender_at_once():
    left, right = _pair()
    got: list[BaseException] = []

    def read() -> None:
        try:
            right.receive_header(Message)
        except LinkClosed as closed:
            got.append(closed)

    reader = threading.Thread(target=read)
    reader.start()
    left.close()
    reader.join(30.0)
    assert got and "closed" in str(got[0])
    with pytest.raises(LinkClosed):
        right.send(Message(Op.SLICE, 1, 0, 0))
