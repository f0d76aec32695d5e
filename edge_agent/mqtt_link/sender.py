"""The single thread that drains the outbox through the MQTT link, QoS 1, acked on PUBACK.

:class:`OutboxSender` is the only thread that publishes outbox records. It publishes with
QoS 1 and acks a record in the outbox only after a successful PUBACK. paho calls
``on_publish`` while holding its own ``_out_message_mutex``, so that callback takes no lock
of ours: it only puts ``(mid, status)`` on a :class:`queue.SimpleQueue` (and, once a
batch of them is waiting, a wake-up on a second one), which the sender thread drains.
Records in flight when the connection drops stay in paho's memory and paho re-sends them
after the reconnect, all at once (paho 2.2 ignores its own ``max_inflight`` there), so
the sender never hands paho more than the broker's Receive Maximum; records still in the
outbox after a process restart are replayed from SQLite. Either way the receiver may see a
sequence number twice, so ingest must be idempotent on ``(device_id, incarnation, seq)``.

Throughput: the sender thread is the only one that leases records from the outbox and
deletes them, but it does not have to be on the GIL for every record to go out. It hands
paho a window of leased records (``max_inflight``, all of them on the wire: the bound is
the sender's, paho's own limit is off, see :meth:`MqttLink._build_client`), and it stages
the next ones on :attr:`MqttLink.feed`, a deque that paho's own thread drains in
``on_publish``: each PUBACK publishes one staged record in its place (``deque.popleft``
needs no lock and paho's mutex is re-entrant), so what paho holds never grows and the
link stays full while the sender waits for the GIL.
The sender wakes when half the feed is gone rather than per PUBACK (every wake-up takes
the GIL from paho's thread), leases records a window at a time (from memory when they
were just put, see :class:`Outbox`) and deletes acknowledged ones a batch per transaction.
The feed is used only while streaming: after a reconnect the sender takes it back and
replays the backlog itself at the flush rate.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from edgefl.edge_agent.mqtt_link.bucket import TokenBucket
from edgefl.edge_agent.mqtt_link.link import (
    _ACK_OK,
    _NOT_QUEUED,
    _WAKE,
    MqttLink,
)
from edgefl.edge_agent.outbox import Outbox, Record

__all__ = ["OutboxSender"]

_log = logging.getLogger(__name__)

# The feed holds about this much sending at the PUBACK rate measured over the last
# _RATE_INTERVAL_S, between one window and _STAGE_MAX_WINDOWS windows (see OutboxSender).
_STAGE_SECONDS = 0.05
_STAGE_MAX_WINDOWS = 16
_RATE_INTERVAL_S = 0.2


class OutboxSender:
    """The single thread that publishes outbox records with QoS 1 and acks them.

    The thread keeps at most ``window`` records handed to paho and not yet acknowledged,
    and fewer than the broker's Receive Maximum (one place is left for the link's status
    message); paho puts each on the wire at once. More leased records are staged on the
    link's feed, which paho's thread publishes one per PUBACK, so the link stays full while
    this thread is elsewhere (never during the rate-limited flush after a reconnect). The
    feed holds about :data:`_STAGE_SECONDS` of sending at the PUBACK rate measured, at
    least ``window`` and at most :data:`_STAGE_MAX_WINDOWS` windows, so that a fast link
    wakes this thread (which takes the GIL from paho's) rarely while a slow one holds few
    records. A new record of higher priority may wait behind the records already leased:
    the window, the feed, and up to a window more leased for the next refill.

    A record is deleted from the outbox only after a successful PUBACK; deletions are
    batched (one transaction per ``ack_batch`` PUBACKs, or as soon as the link goes quiet,
    or after ``ack_delay_s``): an acknowledged record stays leased until then, so it is
    never sent again by this process, and one that a crash leaves undeleted is sent again
    after the restart (a duplicate the ingest drops). A failed PUBACK, such as 0x87 "Not
    authorized" for a device the broker's ACL does not name yet (admitted moments before
    the server reloaded it), deletes nothing: the record is sent again after
    ``retry_after_s``. A record over the largest payload the fleet carries never reaches
    this thread: the outbox refuses it at put, and sets aside one an older version stored
    (a PUBACK 0x95 for it would drop the connection on every attempt).

    Args:
        outbox: Where records come from; acked there on a successful PUBACK.
        link: The MQTT link to publish on.
        window: Records handed to paho and not yet acknowledged; the link's
            ``max_inflight`` by default.
        poll_s: Longest idle wait before looking at the outbox again (see :meth:`wake`).
        retry_after_s: Wait before re-sending a record whose PUBACK reported failure.
        ack_batch: PUBACKs collected before their records are deleted in one transaction.
        ack_delay_s: Longest time a PUBACK waits for its deletion while the link is busy.
    """

    def __init__(
        self,
        outbox: Outbox,
        link: MqttLink,
        *,
        window: int | None = None,
        poll_s: float = 0.05,
        retry_after_s: float = 1.0,
        ack_batch: int = 200,
        ack_delay_s: float = 0.05,
    ) -> None:
        self.outbox = outbox
        self.link = link
        self.window = window if window is not None else link.config.max_inflight
        self.poll_s = poll_s
        self.retry_after_s = retry_after_s
        self.ack_batch = ack_batch
        self.ack_delay_s = ack_delay_s
        self.published = 0
        self.acked = 0
        self.failed = 0
        self._in_flight: dict[int, int] = {}  # mid -> seq
        self._cooling: dict[int, float] = {}  # seq -> monotonic time it may be re-sent
        self._pending: deque[Record] = deque()  # leased, not yet handed to paho
        # Leased records paho's own thread publishes, one per PUBACK (MqttLink.feed), so
        # that the window stays full while this thread waits for the GIL; refilled when
        # half of it is gone. Fed only while streaming (never during the rate-limited
        # flush after a reconnect), and taken back whenever the connection changes. Its
        # size follows the PUBACK rate (see _resize_stage).
        self._staged: deque[Record] = deque()
        self._stage_max = self.window
        self._rate_since = time.monotonic()
        self._rate_acks = 0  # PUBACKs counted at _rate_since
        self._done: list[int] = []  # PUBACKed, not yet deleted
        self._done_since = 0.0  # monotonic time of the oldest entry of _done
        # Under load (and without a feed, as during the rate-limited flush), refill once
        # half the window is free (one wake-up per refill), so the link never goes quiet
        # (which, with a broker that leaves Nagle on, would hold PUBACKs back until a
        # delayed TCP ACK).
        self._refill_min = max(1, self.window // 2)
        self._stop = threading.Event()
        self._drain_s = 0.0
        rate = link.config.flush_rate_per_s
        self._bucket = (
            TokenBucket(rate, burst=max(1.0, min(float(self.window), rate)))
            if rate is not None
            else None
        )
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)

    @property
    def in_flight(self) -> int:
        """Records published and waiting for their PUBACK."""
        return len(self._in_flight)

    @property
    def feed_capacity(self) -> int:
        """Leased records the feed may hold now: ``window`` when idle, more on a fast link."""
        return self._stage_max

    def start(self) -> None:
        """Start the sender thread."""
        self._thread.start()

    def wake(self) -> None:
        """Look at the outbox now instead of after up to ``poll_s`` (call after a put)."""
        self.link.publish_results.put((_WAKE, _ACK_OK))
        self.link.result_signal.put(None)

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Stop publishing, wait up to ``drain_timeout_s`` for PUBACKs, join the thread.

        Records without a PUBACK stay in the outbox and are sent again on the next start.
        """
        self._drain_s = drain_timeout_s
        self._stop.set()
        self.wake()
        if self._thread.ident is not None:  # started
            self._thread.join()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._unstage()
            self._flush_acks()
            if self._pending:
                # Leased but never handed to paho: give them back to the outbox.
                self.outbox.release_many(r.seq for r in self._pending)
                self._pending.clear()

    def _loop(self) -> None:
        seen_generation = -1
        seen_epoch = self.link.client_epoch
        flushing = False
        link = self.link
        staged = self._staged
        while not self._stop.is_set():
            self._drain_results(0.0)
            self._resize_stage()
            low = self._stage_max // 2
            if self._cooling:
                self._end_cooling()
            if link.client_epoch != seen_epoch:
                # A new paho client (protocol fallback) never knew the old mids.
                seen_epoch = link.client_epoch
                self._unstage()
                self._in_flight.clear()
                self._pending.clear()
                self._flush_acks()
                self.outbox.release_all()
            if not link.connected:
                self._unstage()
                self._flush_acks()
                self._await_results(1, self.poll_s)
                continue
            if link.generation != seen_generation:
                # (Re)connected: paho re-sends what it held; the backlog is replayed from
                # the outbox at a bounded rate so it does not swamp the broker or the link.
                seen_generation = link.generation
                self._unstage()
                flushing = self._bucket is not None
                if self._bucket is not None:
                    self._bucket.reset()
            # Fewer than the broker's Receive Maximum awaiting PUBACK (one place is the
            # status message's), also right after a reconnect, when paho re-sends all it
            # holds at once. The feed does not add to it: paho's thread publishes one fed
            # record per PUBACK.
            window = min(self.window, max(1, link.receive_maximum - 1))
            room = window - len(self._in_flight)
            need = min(self._refill_min, window)
            # Results until the feed is down to low: each staged record brings two
            # (published, then PUBACKed).
            feed_drained = 2 * max(window, len(staged) - low)
            if room < need and (flushing or len(staged) > low):
                # Busy: sleep until the feed is half gone (or, without one, a whole
                # refill's worth of room is free), instead of waking (and taking the GIL
                # from paho's thread) for every PUBACK.
                self._await_results(feed_drained if staged else need - room, self.poll_s)
                continue
            stage_room = 0 if flushing else max(0, self._stage_max - len(staged))
            wanted = room + stage_room
            if flushing and self._bucket is not None:
                wanted = self._bucket.take(room)
                if wanted == 0:
                    self._await_results(1, min(self.poll_s, self._bucket.wait_s()))
                    continue
            pending = self._pending
            if len(pending) < wanted:
                pending.extend(self.outbox.next_batch(max(window, wanted - len(pending))))
            if flushing and len(pending) < wanted:
                # The backlog is drained: new records go out at the link's pace.
                flushing = False
                if self._bucket is not None:
                    self._bucket.give_back(wanted - len(pending))
            if not pending:
                if not staged:
                    # Idle: this is when acknowledged records are deleted without delay.
                    self._flush_acks()
                    self._await_results(1, self.poll_s)
                else:
                    self._await_results(feed_drained, self.poll_s)
                continue
            # Straight to paho: what the window has room for, and while flushing only what
            # the bucket allowed (wanted is then at most room).
            for _ in range(min(room, wanted, len(pending))):
                record = pending.popleft()
                self._publish(record.seq, record.topic, record.payload)
            if not flushing and pending:
                for _ in range(min(self._stage_max - len(staged), len(pending))):
                    staged.append(pending.popleft())
                link.feed_low = low
                link.feed_generation = seen_generation
                link.feed = staged
        self._unstage()
        deadline = time.monotonic() + self._drain_s
        while self._in_flight and time.monotonic() < deadline:
            self._drain_results(min(self.poll_s, max(0.0, deadline - time.monotonic())))

    def _unstage(self) -> None:
        """Take the feed back from paho's thread; its records go back to the front of pending."""
        self.link.feed = None
        taken: list[Record] = []
        with contextlib.suppress(IndexError):
            while True:  # paho's thread may pop concurrently: each record goes one way
                taken.append(self._staged.popleft())
        self._pending.extendleft(reversed(taken))

    def _publish(self, seq: int, topic: str, payload: bytes) -> None:
        try:
            mid, rc = self.link.publish(topic, payload, qos=1)
        except ValueError as exc:
            # paho refuses the topic itself (wildcards, too long): retrying cannot help.
            _log.error("record seq=%d cannot be published on %r: %s", seq, topic, exc)
            self._cool(seq)
            return
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            _log.warning("paho did not queue seq=%d: %s", seq, mqtt.error_string(rc))
            self._cool(seq)
            return
        self._in_flight[mid] = seq
        self.published += 1

    def _drain_results(self, block_s: float) -> None:
        results: list[tuple[int, int]] = []
        get = self.link.publish_results.get_nowait
        try:
            if block_s > 0:
                results.append(self.link.publish_results.get(timeout=block_s))
            while True:
                results.append(get())
        except queue.Empty:
            pass
        in_flight = self._in_flight
        done = self._done
        for mid, status in results:
            if status < 0:
                # A fed record paho's thread published (or could not queue).
                if mid == _NOT_QUEUED:
                    _log.warning("paho did not queue fed seq=%d", -status)
                    self._cool(-status)
                else:
                    in_flight[mid] = -status
                    self.published += 1
                continue
            seq = in_flight.pop(mid, None)
            if seq is None:
                continue  # the status message, a wake-up, or a mid of a replaced client
            if status == _ACK_OK:
                if not done:
                    self._done_since = time.monotonic()
                done.append(seq)
            else:
                self.failed += 1
                _log.warning("broker refused seq=%d (failed PUBACK); will retry", seq)
                self._cool(seq)
        if done and (
            len(done) >= self.ack_batch
            or not in_flight
            or time.monotonic() - self._done_since >= self.ack_delay_s
        ):
            self._flush_acks()

    def _resize_stage(self) -> None:
        """Size the feed to :data:`_STAGE_SECONDS` of sending at the recent PUBACK rate."""
        now = time.monotonic()
        elapsed = now - self._rate_since
        if elapsed < _RATE_INTERVAL_S:
            return
        acks = self.acked + len(self._done)
        rate = (acks - self._rate_acks) / elapsed
        self._rate_since, self._rate_acks = now, acks
        cap = _STAGE_MAX_WINDOWS * self.window
        self._stage_max = max(self.window, min(cap, int(rate * _STAGE_SECONDS)))

    def _await_results(self, count: int, timeout: float) -> None:
        """Sleep until ``count`` publish results are waiting (or a wake-up, or ``timeout``).

        Every wait of the loop comes here, so the signal queue never grows unread.
        """
        link = self.link
        link.signal_after = count
        if link.publish_results.qsize() < count:
            with contextlib.suppress(queue.Empty):
                link.result_signal.get(timeout=timeout)
        with contextlib.suppress(queue.Empty):
            while True:  # signals that are stale by now
                link.result_signal.get_nowait()
        self._drain_results(0.0)

    def _flush_acks(self) -> None:
        """Delete the records whose PUBACK arrived, in one transaction."""
        if self._done:
            done, self._done = self._done, []
            self.outbox.ack_many(done)
            self.acked += len(done)

    def _cool(self, seq: int) -> None:
        # Keep the lease for a while so a record the broker refuses is not re-sent in a
        # tight loop; _end_cooling releases it.
        self._cooling[seq] = time.monotonic() + self.retry_after_s

    def _end_cooling(self) -> None:
        now = time.monotonic()
        ready = [s for s, t in self._cooling.items() if t <= now]
        for seq in ready:
            del self._cooling[seq]
        if ready:
            self.outbox.release_many(ready)
