"""A link (worker/transport/socket_link.py) over a real loopback connection: arrays larger than
the kernel's buffers arrive whole, with their bits, in order, in the receiver's own arrays; a
peer that closes is reported at once on both the receiving and the sending side; and
wait_acknowledged, the direct transport's proof of delivery, waits for the peer's kernel, not
for the local one (Linux: SIOCOUTQ)."""

from __future__ import annotations

import socket
import sys
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


@pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ: elsewhere a flush is all")
def test_what_the_peer_has_not_acknowledged_is_waited_for_past_the_local_kernel():
    """A peer whose receive window is full acknowledges nothing more: the bytes are in this
    kernel's hands (flush returns) but not acknowledged, and wait_acknowledged times out;
    once the peer reads them, it returns."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small, fixed window
    left = connect(server.getsockname()[:2], 30.0)
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # room for all it sends
    right, _ = server.accept()
    server.close()
    sender = Link(left, "the peer")
    payload = np.zeros(256 * 1024, np.uint8)  # far past the window, within the send buffer
    sender.send(Message(Op.SLICE, 1, 0, payload.nbytes), payload)
    sender.flush(30.0)
    with pytest.raises(TimeoutError, match="did not acknowledge"):
        sender.wait_acknowledged(0.2)

    def read_all() -> None:
        received = np.empty(Message.layout.size + payload.nbytes, np.uint8)
        view, got = memoryview(received), 0
        while got < received.nbytes:
            got += right.recv_into(view[got:])

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    sender.wait_acknowledged(30.0)
    reader.join(30.0)
    sender.close()
    right.close()
