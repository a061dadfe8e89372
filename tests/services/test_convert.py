"""Records to protobuf messages: the counters a long job reaches fit, on the wire and in JSON."""

from google.protobuf import json_format

from chainrule.v1 import training_service_pb2 as pb
from services.convert import progress_to_proto
from services.store import ProgressSummary, ValidationSummary

BEYOND_32_BITS = 2**32 + 5


def test_progress_counters_past_two_to_the_32_survive_the_wire_unchanged():
    summary = ProgressSummary(step=BEYOND_32_BITS, total_steps=2**40, epoch=BEYOND_32_BITS,
                              epochs=2**33, loss=0.5, samples_per_second=10.0, eta_seconds=1.0,
                              validation=ValidationSummary(BEYOND_32_BITS, 0.25, 0.9, 2**35))
    message = pb.Progress.FromString(progress_to_proto(summary).SerializeToString())
    assert (message.step, message.total_steps, message.epoch, message.epochs) == (
        BEYOND_32_BITS, 2**40, BEYOND_32_BITS, 2**33)
    assert (message.validation.step, message.validation.samples) == (BEYOND_32_BITS, 2**35)
    # The JSON mapping writes 64-bit integers as strings; parsing gives the numbers back.
    assert json_format.MessageToDict(message)["step"] == str(BEYOND_32_BITS)
    assert json_format.Parse(json_format.MessageToJson(message), pb.Progress()) == message


def test_widened_counters_keep_the_uint32_wire_format_for_older_clients():
    # A varint either way: field 1 (step) = 300 is the bytes a uint32 field wrote, 08 ac 02.
    assert pb.Progress(step=300).SerializeToString() == bytes([0x08, 0xAC, 0x02])
    assert pb.ValidationMetrics(step=300).SerializeToString() == bytes([0x08, 0xAC, 0x02])
