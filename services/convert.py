"""Protobuf <-> domain, in one place: the servicer and the client never build messages field by
field themselves."""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp

from chainrule.v1 import training_service_pb2 as pb
from scheduler.job_states import state_from_proto, state_to_proto
from services.events import JobEvent
from services.jobs import ModelDownload
from services.store import DatasetRecord, JobRecord, ProgressSummary, ValidationSummary
from services.uploads import UploadHeader


def states_from_proto(values) -> list[str]:
    from services.errors import InvalidArgument

    states = []
    for index, value in enumerate(values):
        if value not in pb.JobState.values() or value == pb.JOB_STATE_UNSPECIFIED:
            raise InvalidArgument(f"states[{index}]", f"not a job state: {value}")
        states.append(state_from_proto(value))
    return states


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def validation_to_proto(summary: ValidationSummary) -> pb.ValidationMetrics:
    message = pb.ValidationMetrics(step=summary.step, loss=summary.loss, samples=summary.samples)
    if summary.accuracy is not None:
        message.accuracy = summary.accuracy
    return message


def progress_to_proto(summary: ProgressSummary) -> pb.Progress:
    message = pb.Progress(step=summary.step, total_steps=summary.total_steps,
                          epoch=summary.epoch, epochs=summary.epochs, loss=summary.loss,
                          samples_per_second=summary.samples_per_second,
                          eta_seconds=summary.eta_seconds)
    if summary.validation is not None:
        message.validation.CopyFrom(validation_to_proto(summary.validation))
    return message


def job_to_proto(job: JobRecord) -> pb.Job:
    message = pb.Job(id=job.id, name=job.name, state=state_to_proto(job.state), spec=job.spec,
                     error=job.error, request_id=job.request_id,
                     created_at=_timestamp(job.created_at), started_at=_timestamp(job.started_at),
                     finished_at=_timestamp(job.finished_at),
                     queue_position=job.queue_position, wait_reason=job.wait_reason,
                     running_seconds=job.seconds_running(time.time()))
    if job.progress is not None:
        message.progress.CopyFrom(progress_to_proto(job.progress))
    if job.final_validation is not None:
        message.final_validation.CopyFrom(validation_to_proto(job.final_validation))
    return message


def event_to_proto(event: JobEvent) -> pb.JobEvent:
    message = pb.JobEvent(job_id=event.job_id, time=_timestamp(event.time))
    if event.kind == "state":
        message.state.CopyFrom(pb.JobEvent.StateChange(state=state_to_proto(event.state),
                                                       error=event.error))
    elif event.kind == "progress" and event.progress is not None:
        message.progress.CopyFrom(progress_to_proto(event.progress))
    elif event.kind == "validation" and event.validation is not None:
        message.validation.CopyFrom(validation_to_proto(event.validation))
    elif event.kind == "recovery" and event.recovery is not None:
        message.recovery.CopyFrom(pb.JobEvent.Recovery(step=event.recovery.step,
                                                       kind=event.recovery.kind,
                                                       message=event.recovery.message))
    return message


def dataset_to_proto(record: DatasetRecord) -> pb.DatasetInfo:
    return pb.DatasetInfo(
        name=record.name, format=record.format, size_bytes=record.size_bytes,
        sha256=record.sha256, samples=record.samples,
        validation_samples=record.validation_samples, feature_shape=list(record.feature_shape),
        task=record.task, num_classes=record.num_classes,
        created_at=_timestamp(record.created_at))


def upload_header_from_proto(message: pb.DatasetHeader) -> UploadHeader:
    return UploadHeader(name=message.name, format=message.format,
                        label_column=message.label_column, size_bytes=message.size_bytes,
                        sha256=message.sha256)


def model_header_to_proto(download: ModelDownload) -> pb.ModelHeader:
    return pb.ModelHeader(format=download.format, size_bytes=len(download.data),
                          sha256=download.sha256, model_spec_json=download.model_spec_json,
                          manifest_json=download.manifest_json)
