"""The gRPC adapter: authenticate, convert the request, call the domain, convert the answer.

No decisions are made here; the domain (`services/jobs.py`) raises `ServiceError`s and this
module turns every failure into a status in one place (`_abort`), so every RPC reports errors
the same way:
- a `ServiceError` is its own status and message (INVALID_ARGUMENT naming the field, ...);
- a full disk, wherever it was hit, is RESOURCE_EXHAUSTED with a message a person can act on;
- anything else is a bug: INTERNAL, logged with its traceback under a fresh id, and the caller
  is told only "internal error, see server log <id>" (no server paths or internals).
A request whose bytes do not parse as its message is INVALID_ARGUMENT too
(`RequestDecodingInterceptor`), where gRPC alone would answer INTERNAL.
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from chainrule.client import CHUNK_BYTES
from chainrule.v1 import training_service_pb2 as pb
from chainrule.v1 import training_service_pb2_grpc as pb_grpc
from services import convert
from services.auth import Authenticator
from services.errors import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ServiceError,
    disk_full,
)
from services.inference import ModelServing, RowsFile
from services.job_logs import job_log
from services.jobs import JobService
from services.tracking.tensorboard import TensorBoardFiles, tensorboard_archive

log = logging.getLogger(__name__)



def _status(error: ServiceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def _abort(context: grpc.ServicerContext, method: str, error: Exception) -> NoReturn:
    if isinstance(error, ServiceError):
        context.abort(_status(error), error.message)
    full = disk_full(error)
    if full is not None:
        log.error("%s: the data folder's disk is full: %s", method, error)
        context.abort(_status(full), full.message)
    if isinstance(error, grpc.RpcError) and not context.is_active():
        # Reading the request stream failed because the client went away: no one to answer.
        context.abort(grpc.StatusCode.CANCELLED, "the client cancelled the call")
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", error_id, method, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error, see server log {error_id}")


def _handles_errors(method: Callable) -> Callable:
    """Any exception of the RPC -> its status, by `_abort` (a bug fails one call, not the
    server)."""

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as error:
                _abort(context, method.__name__, error)
        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as error:
            _abort(context, method.__name__, error)
    return unary


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    def __init__(self, service: JobService, authenticator: Authenticator,
                 tensorboard: TensorBoardFiles):
        self.service = service
        self.tensorboard = tensorboard
        self.auth = authenticator
        self.models = ModelServing(service)

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
    def ResumeJob(self, request: pb.ResumeJobRequest, context) -> pb.Job:
        job = self.service.resume(self._tenant(context), request.job_id, request.epochs)
        return convert.job_to_proto(job)

    @_handles_errors
    def DrainNode(self, request: pb.DrainNodeRequest, context) -> pb.DrainNodeResponse:
        tenant = self._tenant(context)
        if not self.auth.is_admin(tenant):
            raise PermissionDenied(f"DrainNode is for admins: tenant {tenant!r} has no admin "
                                   f"role (role: admin in the server's configuration file, "
                                   f"role=admin in a token file)")
        result = self.service.drain_node(request.node, request.undrain)
        return pb.DrainNodeResponse(node_ids=result.node_ids, job_ids=result.job_ids)

    @_handles_errors
    def DeleteJob(self, request: pb.DeleteJobRequest, context) -> pb.DeleteJobResponse:
        self.service.delete(self._tenant(context), request.job_id)
        return pb.DeleteJobResponse()

    @_handles_errors
    def WatchJob(self, request: pb.WatchJobRequest, context) -> Iterator[pb.JobEvent]:
        events = self.service.watch(self._tenant(context), request.job_id,
                                    request.min_progress_interval_ms / 1000.0,
                                    is_active=context.is_active)
        for event in events:
            if not context.is_active():
                return
            yield convert.event_to_proto(event)

    @_handles_errors
    def UploadDataset(self, request_iterator: Iterator[pb.UploadDatasetRequest],
                      context) -> pb.DatasetInfo:
        tenant = self._tenant(context)
        request_iterator = _with_idle_timeout(request_iterator,
                                              self.service.upload_limits.idle_seconds)
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

    @_handles_errors
    def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        rows, file = None, None
        kind = request.WhichOneof("input")
        if kind == "rows":
            rows = (list(request.rows.values), list(request.rows.shape))
        elif kind == "file":
            file = RowsFile(request.file.format, request.file.data, request.file.label_column)
        elif kind is None:
            raise InvalidArgument("input", "required: rows, a file of rows (file) or the name "
                                           "of an upload (dataset)")
        result = self.models.predict(self._tenant(context), request.job_id, rows,
                                     request.dataset, file)
        response = pb.PredictResponse(task=result.task, samples=result.samples)
        if result.classes is not None:
            response.classes.extend(result.classes.tolist())
        if result.probabilities is not None:
            response.num_classes = result.probabilities.shape[-1]
            response.probabilities.extend(result.probabilities.reshape(-1).tolist())
        if result.values is not None:
            response.value_shape.extend(result.values.shape[1:])
            response.values.extend(result.values.reshape(-1).tolist())
        return response

    @_handles_errors
    def EvaluateJob(self, request: pb.EvaluateJobRequest, context) -> pb.EvaluateJobResponse:
        result = self.models.evaluate(self._tenant(context), request.job_id, request.dataset)
        response = pb.EvaluateJobResponse(samples=result.samples, loss=result.loss)
        if result.accuracy is not None:
            response.accuracy = result.accuracy
        if result.confusion_matrix is not None:
            response.num_classes = len(result.confusion_matrix)
            response.confusion_matrix.extend(result.confusion_matrix.reshape(-1).tolist())
        return response

    @_handles_errors
    def Generate(self, request: pb.GenerateRequest, context) -> Iterator[pb.GenerateResponse]:
        for data in self.models.generate(self._tenant(context), request.job_id, request.prompt,
                                         request.temperature, request.top_k,
                                         request.max_tokens, request.seed):
            if not context.is_active():
                return
            yield pb.GenerateResponse(data=data)

    @_handles_errors
    def GetJobLogs(self, request: pb.GetJobLogsRequest, context) -> Iterator[pb.LogEntry]:
        for line in job_log(self.service, self._tenant(context), request.job_id,
                            request.follow, context.is_active):
            entry = pb.LogEntry(kind=line.kind, message=line.message)
            entry.time.FromNanoseconds(int(line.time * 1e9))
            yield entry

    @_handles_errors
    def DownloadTensorBoard(self, request: pb.DownloadTensorBoardRequest,
                            context) -> Iterator[pb.DownloadTensorBoardResponse]:
        for chunk in tensorboard_archive(self.service, self.tensorboard, self._tenant(context),
                                         request.job_id):
            if not context.is_active():
                return
            yield pb.DownloadTensorBoardResponse(chunk=chunk)


def _chunks(requests: Iterator[Any]) -> Iterator[bytes]:
    for index, request in enumerate(requests, start=1):
        if request.HasField("header"):
            raise InvalidArgument("header", f"message {index} is a second header; after the "
                                            f"header come only chunks")
        yield request.chunk


def _with_idle_timeout(requests: Iterator[Any], idle_seconds: float) -> Iterator[Any]:
    """The client's messages as they arrive; DEADLINE_EXCEEDED when none arrives for
    `idle_seconds`, so a stalled client cannot hold an RPC thread and a temporary file.

    gRPC's request iterator has no timeout of its own: a helper thread reads it into a
    one-message queue (memory stays at one chunk). The thread ends with the call, which gRPC
    closes as soon as this RPC answers."""
    slot: queue.Queue = queue.Queue(maxsize=1)
    finished = threading.Event()
    end = object()

    def read() -> None:
        try:
            for request in requests:
                if not _put(request):
                    return
            _put(end)
        except Exception as error:  # the client went away, or a message did not decode
            _put(error)

    def _put(item: Any) -> bool:
        while not finished.is_set():
            try:
                slot.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    threading.Thread(target=read, name="upload-reader", daemon=True).start()
    try:
        while True:
            try:
                item = slot.get(timeout=idle_seconds)
            except queue.Empty:
                raise DeadlineExceeded(f"chunk: no message for {idle_seconds:g} s; the upload "
                                       f"was abandoned") from None
            if item is end:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        finished.set()


# --- requests that do not parse -------------------------------------------------------------


class UndecodableRequest(InvalidArgument):
    def __init__(self, message_name: str, error: Exception):
        super().__init__("request", f"not a valid {message_name} message: {error}")


class _Undecoded:
    """What a request that failed to parse becomes, instead of gRPC's INTERNAL."""

    def __init__(self, error: UndecodableRequest):
        self.error = error


class RequestDecodingInterceptor(grpc.ServerInterceptor):
    """Requests whose bytes do not parse (truncated, corrupted, nested too deep, invalid UTF-8
    in a string) get INVALID_ARGUMENT "request: not a valid <Message> message: ...".

    gRPC calls the deserializer itself and answers INTERNAL when it raises; here it never
    raises, and the handler answers for the undecodable request instead."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = _decoder(handler.request_deserializer)
        if handler.request_streaming:
            behavior = handler.stream_stream or handler.stream_unary

            def checked(requests: Iterator[Any]) -> Iterator[Any]:
                for request in requests:
                    if isinstance(request, _Undecoded):
                        raise request.error
                    yield request

            if handler.response_streaming:
                def stream_stream(requests, context):
                    try:
                        yield from behavior(checked(requests), context)
                    except UndecodableRequest as error:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
                return handler._replace(stream_stream=stream_stream, request_deserializer=decode)

            def stream_unary(requests, context):
                try:
                    return behavior(checked(requests), context)
                except UndecodableRequest as error:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
            return handler._replace(stream_unary=stream_unary, request_deserializer=decode)

        field = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, field)

        def unary_request(request, context):
            if isinstance(request, _Undecoded):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error.message)
            return behavior(request, context)
        return handler._replace(**{field: unary_request, "request_deserializer": decode})


def _decoder(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    message_name = name.full_name if name is not None else "request"

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # protobuf's DecodeError, RecursionError, ...
            return _Undecoded(UndecodableRequest(message_name, error))
    return decode
