"""A sink that never blocks its caller: records go into a bounded in-memory queue and a
thread of their own delivers them to a destination (a file, a socket, a collector).

Semantics, the same for every destination:

- ``emit()`` only appends to the queue (under a lock held for microseconds). When the
  queue holds ``queue_size`` records, the new record is dropped and counted (``dropped``).
- A record leaves the queue only once it is *delivered*: written to the file, acknowledged
  by the peer's TCP stack (or by the Fluentd ``ack``). Records written to a connection that
  then failed before they were acknowledged stay at the head of the queue and are sent
  again, first, on the next connection: order is kept and nothing the queue held is lost.
- A destination that is down is retried with exponential backoff (0.1 s doubling to 10 s);
  meanwhile records accumulate up to the bound. The first failure of an outage is logged
  once (a warning on stderr), the recovery once.
- ``close()`` waits up to ``flush_timeout`` seconds for the queue to drain; what is left
  after that is counted as dropped and logged.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque

import structlog

from .console import Sink

log = structlog.get_logger("rst-tracer")

DEFAULT_QUEUE_SIZE = 10000
DEFAULT_FLUSH_TIMEOUT = 5.0
BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 10.0
CONFIRM_POLL = 0.02     # how often unacknowledged bytes are re-checked
IDLE_CHECK = 1.0        # how often an idle connection is checked for a peer that went away


class Transport:
    """One destination, used only by its QueuedSink's thread (``interrupt`` excepted).

    Every method may raise OSError: the sink then closes the transport, backs off and
    opens it again, resending what was not confirmed."""

    max_batch = 500

    def open(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise OSError if the destination is known to be gone (peer closed...)."""

    def send(self, records: list) -> list:
        """Encode all of ``records`` (OSError aside, any exception must come from here,
        before anything is written), then write them in order; return the delivery units in order, as
        ``(number of records, number of bytes)`` pairs. May write only a prefix of
        ``records`` (the units say how many); the rest comes again in the next batch."""
        raise NotImplementedError

    def unacked(self) -> int:
        """Bytes written on this connection that the destination has not acknowledged yet."""
        return 0

    def interrupt(self) -> None:
        """Called from another thread to unblock a send stuck on a dead destination."""

    def close(self) -> None:
        pass


class QueuedSink(Sink):
    def __init__(self, transport: Transport, name: str, queue_size: int = DEFAULT_QUEUE_SIZE,
                 flush_timeout: float = DEFAULT_FLUSH_TIMEOUT, backoff_initial: float = BACKOFF_INITIAL,
                 backoff_max: float = BACKOFF_MAX):
        if queue_size < 1:
            raise ValueError("queue size must be at least 1")
        self.transport, self.name = transport, name
        self.queue_size, self.flush_timeout = queue_size, flush_timeout
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self._cond = threading.Condition(threading.Lock())
        self._q: deque = deque()      # oldest first; a record leaves it once delivered
        self._sent = 0                # records at the head written on this connection, unconfirmed
        self._units: deque = deque()  # (records, end byte offset on this connection), unconfirmed
        self._offset = 0              # bytes written on this connection
        self.delivered = self.dropped = self.errors = 0
        self.connected = False
        self._closing = self._abort = self._kick = False
        self._down_since = None
        self._single = 0              # records still to send one by one (finding one that cannot be encoded)
        self._thread = threading.Thread(target=self._run, name=f"sink {name}", daemon=True)
        self._thread.start()

    # -- the caller's side: never blocks --------------------------------------------------
    def emit(self, record: dict) -> None:
        with self._cond:
            if self._closing or len(self._q) >= self.queue_size:
                self.dropped += 1
                return
            self._q.append(record)
            self._cond.notify()

    def offer(self, record: dict) -> bool:
        """Enqueue if there is room; a full queue refuses without counting a drop (used for
        reports about drops, which must not feed themselves)."""
        with self._cond:
            if self._closing or len(self._q) >= self.queue_size:
                return False
            self._q.append(record)
            self._cond.notify()
            return True

    def stats(self) -> dict:
        with self._cond:
            return {"name": self.name, "queued": len(self._q), "delivered": self.delivered,
                    "dropped": self.dropped, "errors": self.errors, "connected": self.connected}

    def close(self, timeout: float = None) -> None:
        """Deliver what is queued for up to `timeout` s (default: the sink's flush_timeout;
        math.inf: as long as it takes), then drop and count the rest."""
        timeout = self.flush_timeout if timeout is None else timeout
        with self._cond:
            self._closing = self._kick = True
            self._cond.notify_all()
        self._thread.join(None if timeout == math.inf else timeout)
        if self._thread.is_alive():
            with self._cond:
                self._abort = True
                self._cond.notify_all()
            self.transport.interrupt()
            self._thread.join(1.0)
        with self._cond:
            left = len(self._q)
            self.dropped += left
            self._q.clear()
            self._units.clear()
            self._sent = 0
        if left:
            log.warning("output closed with undelivered records", output=self.name, dropped=left,
                        flush_timeout_s=timeout)

    # -- the sink's thread ----------------------------------------------------------------
    def _run(self) -> None:
        delay = self.backoff_initial
        while not self._abort:
            if not self.connected:
                with self._cond:
                    if self._closing and not self._q:
                        break
                try:
                    self.transport.open()
                except OSError as e:
                    self._failed(e)
                    self._sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                with self._cond:
                    self.connected = True
                if self._down_since is not None:
                    log.warning("output reachable again; sending what was queued", output=self.name,
                                down_s=round(time.monotonic() - self._down_since, 1),
                                queued=len(self._q))
                    self._down_since = None
            batch_len = 0
            try:
                self.transport.check()
                if self._confirm():
                    delay = self.backoff_initial
                batch = self._next_batch()
                if batch is None:
                    break
                if batch:
                    batch_len = len(batch)
                    units = self.transport.send(batch)
                    with self._cond:
                        for count, nbytes in units:
                            self._sent += count
                            self._offset += nbytes
                            self._units.append((count, self._offset))
                    if self._confirm():
                        delay = self.backoff_initial
                    self._single = max(0, self._single - 1)
            except OSError as e:
                self._failed(e)
                self._disconnect()
                self._sleep(delay)
                delay = min(delay * 2, self.backoff_max)
            except Exception as e:  # noqa: BLE001 — a record that cannot be encoded: drop it, not the thread
                self._unencodable(e, batch_len)
        self._disconnect()

    def _unencodable(self, e: Exception, batch_len: int) -> None:
        """Transports encode a whole batch before writing any of it, so nothing was sent:
        retry that batch one record at a time, and drop (and count) only what fails alone."""
        if not batch_len:   # not from encoding (a bug): keep the records, do not spin
            log.error("output failed unexpectedly; retrying", output=self.name,
                      error=f"{e.__class__.__name__}: {e}")
            with self._cond:
                self.errors += 1
            self._disconnect()
            self._sleep(self.backoff_max)
            return
        if batch_len > 1 and not self._single:
            self._single = batch_len
            return
        self._single = max(0, self._single - 1)
        with self._cond:
            if len(self._q) <= self._sent:
                return
            bad = self._q[self._sent]
            del self._q[self._sent]
            self.dropped += 1
            self.errors += 1
        log.error("output cannot encode a record; dropped it", output=self.name,
                  error=f"{e.__class__.__name__}: {e}",
                  record_type=str(bad.get("type") if isinstance(bad, dict) else type(bad).__name__))

    def _next_batch(self):
        """The records after those already written (``[]`` to just poll; None: finished)."""
        with self._cond:
            if self._abort or (self._closing and not self._q):
                return None
            if len(self._q) <= self._sent:
                self._cond.wait(CONFIRM_POLL if self._units else IDLE_CHECK)
            if self._abort:
                return None
            size = 1 if self._single else self.transport.max_batch
            return list(itertools.islice(self._q, self._sent, self._sent + size))

    def _confirm(self) -> int:
        """Move acknowledged records out of the queue; how many were."""
        if not self._units:
            return 0
        unacked = self.transport.unacked()
        with self._cond:
            acked = self._offset - unacked
            n = 0
            while self._units and self._units[0][1] <= acked:
                n += self._units.popleft()[0]
            for _ in range(n):
                self._q.popleft()
            self._sent -= n
            self.delivered += n
            return n

    def _failed(self, e: OSError) -> None:
        with self._cond:
            self.errors += 1
            self.connected = False
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("output unreachable; queueing and retrying in the background",
                        output=self.name, error=str(e) or e.__class__.__name__,
                        queue_size=self.queue_size)

    def _disconnect(self) -> None:
        try:
            self.transport.close()
        except OSError:
            pass
        with self._cond:
            self.connected = False
            self._sent = 0           # unconfirmed records are sent again, first
            self._units.clear()
            self._offset = 0

    def _sleep(self, delay: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._abort or self._kick, delay)
            self._kick = False   # close() asks for one immediate retry, then normal backoff
