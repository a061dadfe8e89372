"""The gRPC adapter: authenticate, convert the request, call the domain, convert the answer.

No decisions are made here; the domain (`services/jobs.py`) raises `ServiceError`s and this
module turns them into status codes, so every RPC reports errors the same way.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from chainrule.v1 import training_service_pb2 as pb
from chainrule.v1 import training_service_pb2_grpc as pb_grpc
from services import convert
from services.auth import Authenticator
from services.errors import InvalidArgument, ServiceError
from services.jobs import JobService

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024  # well under gRPC's 4 MiB default message limit


def _status(error: ServiceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def _handles_errors(method: Callable) -> Callable:
    """ServiceError -> its status; anything else -> INTERNAL with the error logged (a bug
    must fail one call, not the server)."""

    def abort(context: grpc.ServicerContext, error: Exception) -> None:
        if isinstance(error, ServiceError):
            context.abort(_status(error), error.message)
        log.exception("%s failed", method.__name__)
        context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as error:
                abort(context, error)
        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as error:
            abort(context, error)
    return unary


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    def __init__(self, service: JobService, authenticator: Authenticator):
        self.service = service
        self.auth = authenticator

    def _tenant(self, context: grpc.ServicerContext) -> str:
        return self.auth.tenant(context.invocation_metadata())

    @_handles_errors
    def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.Job:
        job = self.service.submit(self._tenant(context), request.spec, request.request_id)
        return convert.job_to_proto(job)

    @_handles_errors
    def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        return convert.job_to_proto(self.service.get(self._tenant(context), request.job_id))

    @_handles_errors
    def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        jobs, token = self.service.list(self._tenant(context),
                                        convert.states_from_proto(request.states),
                                        request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[convert.job_to_proto(job) for job in jobs],
                                   next_page_token=token)

    @_handles_errors
    def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        return convert.job_to_proto(self.service.cancel(self._tenant(context), request.job_id))

    @_handles_errors
    def WatchJob(self, request: pb.WatchJobRequest, context) -> Iterator[pb.JobEvent]:
        events = self.service.watch(self._tenant(context), request.job_id,
                                    request.min_progress_interval_ms / 1000.0)
        for event in events:
            if not context.is_active():
                return
            yield convert.event_to_proto(event)

    @_handles_errors
    def UploadDataset(self, request_iterator: Iterator[pb.UploadDatasetRequest],
                      context) -> pb.DatasetInfo:
        tenant = self._tenant(context)
        first = next(request_iterator, None)
        header = None
        if first is not None and first.HasField("header"):
            header = convert.upload_header_from_proto(first.header)
        record = self.service.upload(tenant, header, _chunks(request_iterator))
        return convert.dataset_to_proto(record)

    @_handles_errors
    def ListDatasets(self, request: pb.ListDatasetsRequest, context) -> pb.ListDatasetsResponse:
        records, builtin = self.service.datasets(self._tenant(context))
        return pb.ListDatasetsResponse(datasets=[convert.dataset_to_proto(r) for r in records],
                                       builtin=list(builtin))

    @_handles_errors
    def DeleteDataset(self, request: pb.DeleteDatasetRequest,
                      context) -> pb.DeleteDatasetResponse:
        self.service.delete_dataset(self._tenant(context), request.name)
        return pb.DeleteDatasetResponse()

    @_handles_errors
    def DownloadModel(self, request: pb.DownloadModelRequest,
                      context) -> Iterator[pb.DownloadModelResponse]:
        download = self.service.download(self._tenant(context), request.job_id, request.format)
        yield pb.DownloadModelResponse(header=convert.model_header_to_proto(download))
        data = memoryview(download.data)
        for start in range(0, len(data), CHUNK_BYTES):
            yield pb.DownloadModelResponse(chunk=bytes(data[start:start + CHUNK_BYTES]))


def _chunks(requests: Iterator[Any]) -> Iterator[bytes]:
    for index, request in enumerate(requests, start=1):
        if request.HasField("header"):
            raise InvalidArgument("header", f"message {index} is a second header; after the "
                                            f"header come only chunks")
        yield request.chunk
