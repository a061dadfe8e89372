"""The shared-memory transport's messages, through a real named pipe (no Ray)."""

import os

import pytest

from worker.transport.named_pipe import Channel, ChannelTimeout
from worker.transport.shared_memory import (
    REPORT_BYTES,
    BlockReport,
    Op,
    ReportKind,
    ShardCommand,
    ShardReport,
    WorkerCommand,
    decode_report,
)


@pytest.fixture
def pipe(tmp_path):
    channel = Channel(Channel.create(str(tmp_path / "test.fifo")))
    yield channel
    channel.close()


def test_a_worker_command_arrives_with_its_fields_and_its_op(pipe):
    pipe.send(WorkerCommand(Op.COMPUTE, step=12, block=1, micro_lo=2, micro_hi=4, samples=96))
    received = pipe.receive(WorkerCommand, timeout=1)
    assert received == WorkerCommand(Op.COMPUTE, 12, 1, 2, 4, 96)
    assert received.op is Op.COMPUTE


def test_an_apply_command_brings_the_clipping_and_kfac_coefficients(pipe):
    pipe.send(ShardCommand(Op.APPLY, step=7, blocks=2, lr=0.1, coefficient=0.5,
                           kl_coefficient=0.25))
    assert pipe.receive(ShardCommand, timeout=1) == ShardCommand(Op.APPLY, 7, 2, 0.1, 0.5, 0.25)


def test_an_unknown_op_code_is_refused_when_read():
    data = ShardCommand.layout.pack(99, 1, 2, 0.1, 1.0, 1.0)
    with pytest.raises(ValueError, match="99"):
        ShardCommand.unpack(data)


def test_block_and_shard_reports_share_the_runners_inbox_and_come_out_as_themselves(pipe):
    block = BlockReport(ReportKind.BLOCK_DONE, step=5, block=1, loss_sum=12.5, samples=48,
                        correct=40, compute_seconds=0.01, bytes_written=4096,
                        write_seconds=0.001)
    shard = ShardReport(ReportKind.SHARD_APPLIED, step=5, shard=0, squared_norm=2.25,
                        reduce_seconds=0.002, apply_seconds=0.003, bytes_updated=2048)
    pipe.send(block)
    pipe.send(shard)
    assert decode_report(pipe.receive_bytes(REPORT_BYTES, timeout=1)) == block
    assert decode_report(pipe.receive_bytes(REPORT_BYTES, timeout=1)) == shard


def test_a_channel_numbered_past_select_s_limit_of_1024_still_receives_and_times_out(tmp_path):
    # A server holding many connections and files hands a job's pipes such numbers.
    fillers = []
    channel = None
    try:
        while not fillers or fillers[-1] < 1024:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        channel = Channel(Channel.create(str(tmp_path / "high.fifo")))
        assert channel.fd > 1024
        channel.send(WorkerCommand(Op.COMPUTE, step=1, block=0, micro_lo=0, micro_hi=1,
                                   samples=8))
        assert channel.receive(WorkerCommand, timeout=1).step == 1
        with pytest.raises(ChannelTimeout):
            channel.receive(WorkerCommand, timeout=0.01)
    finally:
        for fd in fillers:
            os.close(fd)
        if channel is not None:
            channel.close()
