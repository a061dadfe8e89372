"""Records handled on a thread of their own, off the job's: what the trackers share.

The job queue calls its observers on the job's thread, between steps; a tracker that wrote
files or called a tracking server there would slow the job, or stop it when the disk or the
server hangs. So a tracker only puts (kind, job_id, payload) records on a bounded queue, and
one thread handles them in order. When that thread falls `limit` records behind, new records
are dropped (counted in `dropped`, with one warning) rather than waited for; a record whose
handling raises is passed to `on_error` and the thread goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Record = tuple[str, str, Any]  # (kind, job_id, payload)


@dataclass(frozen=True)
class _Flush:
    """Marker on the queue: everything before it is handled when `done` is set."""

    done: threading.Event


_STOP = object()


class RecordWriter:
    def __init__(self, name: str, handle: Callable[[str, str, Any], None], *, limit: int,
                 on_error: Callable[[Record, Exception], None],
                 on_flush: Callable[[], None] = lambda: None,
                 on_stop: Callable[[], None] = lambda: None):
        """`name`: the thread's name and the log's. `handle(kind, job_id, payload)` runs on
        the thread, as do `on_error` (a record whose handling raised), `on_flush` (after the
        records before a flush) and `on_stop` (after the last record, before the thread
        ends)."""
        self.name = name
        self.dropped = 0  # records not handled: the thread was `limit` records behind
        self._handle, self._on_error = handle, on_error
        self._on_flush, self._on_stop = on_flush, on_stop
        self._records: queue.Queue[Any] = queue.Queue(maxsize=limit)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, kind: str, job_id: str, payload: Any) -> None:
        """Queue a record; never waits."""
        try:
            self._records.put_nowait((kind, job_id, payload))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("%s: %d records wait to be handled; dropping new ones until it "
                            "catches up", self.name, self._records.maxsize)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every record put so far is handled; False on timeout."""
        flushed = _Flush(threading.Event())
        try:
            self._records.put(flushed, timeout=timeout)
        except queue.Full:
            return False
        return flushed.done.wait(timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Handle what is queued, then end the thread; False when that took longer than
        `timeout` (the rest is dropped: a hung disk or server must not hold the stop)."""
        deadline = time.monotonic() + timeout
        try:
            self._records.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("%s: records still queued after %g s are dropped", self.name, timeout)
            return False
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("%s: records still queued after %g s are dropped", self.name, timeout)
            return False
        return True

    def _run(self) -> None:
        while True:
            item = self._records.get()
            if item is _STOP:
                self._on_stop()
                return
            if isinstance(item, _Flush):
                self._on_flush()
                item.done.set()
                continue
            try:
                self._handle(*item)
            except Exception as error:  # a full disk, an outage: never the job's problem
                self._on_error(item, error)
