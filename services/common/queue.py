"""The job queue: a Redis stream read by a consumer group of dispatchers.

A message carries only a job id; the job's state lives in the job store. Delivery is at-least-once:
a dispatcher that dies holding a message loses it to ``reclaim`` after ``reclaim_idle_ms``, and the job
store's fencing token keeps the old and the new attempt from both writing. Live dispatchers running
long jobs call ``heartbeat`` so their messages don't look abandoned.

Key layout (``P`` is the prefix, ``genq`` by default):

- ``P:queue``          stream of ``{job_id}`` messages, consumer group ``group``. Acked messages are
                       deleted, so its length is the number of waiting plus in-flight messages.
- ``P:queue:delayed``  sorted set job_id -> due time (epoch ms, Redis clock): retries waiting for their
                       backoff; ``read`` moves due ones into the stream.
- ``P:queue:dead``     list of JSON dead letters: messages delivered more than ``max_deliveries`` times.

depth = stream length + delayed retries; ``enqueue`` refuses at ``max_depth``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ConfigDict
from redis import Redis
from redis.exceptions import ResponseError

__all__ = ["DeadLetter", "JobQueue", "QueueFull", "QueueMessage"]

_T = TypeVar("_T")


class QueueFull(Exception):
    """The queue holds ``max_depth`` jobs; the API answers 429 with ``Retry-After: retry_after_s``."""

    def __init__(self, retry_after_s: int, depth: int, max_depth: int) -> None:
        self.retry_after_s = retry_after_s
        self.depth = depth
        self.max_depth = max_depth
        super().__init__(
            f"job queue is full ({depth} >= {max_depth} jobs); retry after {retry_after_s} s"
        )


class QueueMessage(BaseModel):
    """A delivered message: ``id`` is the stream id, ``consumer`` the dispatcher that holds it now,
    ``deliveries`` how many times it has been handed out (1 on first delivery)."""

    model_config = ConfigDict(frozen=True)

    id: str
    job_id: str
    deliveries: int
    consumer: str


class DeadLetter(BaseModel):
    """A message given up on after too many deliveries (its dispatchers kept dying on it)."""

    model_config = ConfigDict(frozen=True)

    message_id: str
    job_id: str
    deliveries: int
    dead_at: datetime


class JobQueue:
    """Job ids on a Redis stream with a consumer group (sync client, like ``JobStore``)."""

    def __init__(
        self,
        redis: Redis,
        prefix: str = "genq",
        group: str = "dispatchers",
        *,
        max_depth: int = 1000,
        reclaim_idle_ms: int = 60_000,
        max_deliveries: int = 3,
        backoff_base_s: float = 5.0,
        backoff_max_s: float = 600.0,
        full_retry_after_s: int = 30,
    ) -> None:
        """
        Args:
            max_depth: most jobs waiting, in flight or delayed; ``enqueue`` raises ``QueueFull`` there.
            reclaim_idle_ms: a message not acked nor heartbeated for this long is taken over by
                ``reclaim``; heartbeat at a third of it or more often.
            max_deliveries: a message handed out more often than this goes to the dead letters.
            backoff_base_s, backoff_max_s: retry ``n`` waits ``min(max, base * 2**(n-1))`` seconds.
            full_retry_after_s: what ``QueueFull.retry_after_s`` tells clients.
        """
        if not prefix or ":" in prefix:
            raise ValueError(f"prefix must be non-empty and free of ':', got {prefix!r}")
        for name, value in [
            ("max_depth", max_depth),
            ("reclaim_idle_ms", reclaim_idle_ms),
            ("max_deliveries", max_deliveries),
            ("full_retry_after_s", full_retry_after_s),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < backoff_base_s <= backoff_max_s:
            raise ValueError(
                f"need 0 < backoff_base_s <= backoff_max_s, got {backoff_base_s} and {backoff_max_s}"
            )
        self._redis = redis
        self._group = group
        self._stream = f"{prefix}:queue"
        self._delayed = f"{prefix}:queue:delayed"
        self._dead = f"{prefix}:queue:dead"
        self.max_depth = max_depth
        self.reclaim_idle_ms = reclaim_idle_ms
        self.max_deliveries = max_deliveries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.full_retry_after_s = full_retry_after_s
        self._scripts = {
            name: redis.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()
        }
        # The consumer group is created on first need (see _run), so constructing a queue never
        # talks to Redis: the API starts, and answers /readyz honestly, while Redis is still down.

    def enqueue(self, job_id: str) -> str:
        """Append a job; returns the message id. Raises ``QueueFull`` when depth >= ``max_depth``
        (checked and appended in one script, so concurrent API replicas can't overshoot)."""
        if not job_id:
            raise ValueError("enqueue needs a job id")
        added, value = self._run("enqueue", [self._stream, self._delayed], job_id, self.max_depth)
        if int(added) == 0:
            raise QueueFull(self.full_retry_after_s, int(value), self.max_depth)
        return _text(value)

    def read(
        self, consumer: str, count: int = 1, block_ms: int | None = None
    ) -> list[QueueMessage]:
        """Up to ``count`` new messages for ``consumer``, after moving due delayed retries in.

        ``block_ms`` waits for a message (None = don't wait), but never past the next delayed retry's
        due time, so retries are not held up by a long block. Keep it under the client's socket timeout.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        # 1. move due retries into the stream; learn when the next one is due
        next_due_ms = self._promote_due()
        capped = block_ms is not None and next_due_ms is not None and next_due_ms < block_ms
        block = max(1, cast(int, next_due_ms)) if capped else block_ms
        # 2. new messages for this consumer
        messages = self._read_new(consumer, count, block)
        if not messages and capped:
            # 3. the block ended because a retry fell due: move it in and read without waiting
            self._promote_due()
            messages = self._read_new(consumer, count, None)
        return messages

    def ack(self, message: QueueMessage) -> bool:
        """Done with a message: remove it. Returns False (and does nothing) if ``message.consumer`` no
        longer holds it, e.g. another dispatcher reclaimed it; then that dispatcher owns the job."""
        return bool(self._run("ack", [self._stream], self._group, message.id, message.consumer)[0])

    def retry_later(self, message: QueueMessage, attempt: int) -> bool:
        """Ack ``message`` and deliver its job again after ``backoff_s(attempt)`` (attempt >= 1 is the
        attempt that just failed). False (nothing done) if ``message.consumer`` no longer holds it."""
        delay_ms = int(self.backoff_s(attempt) * 1000)
        reply = self._run(
            "retry_later",
            [self._stream, self._delayed],
            self._group,
            message.id,
            message.consumer,
            message.job_id,
            delay_ms,
        )
        return bool(reply[0])

    def backoff_s(self, attempt: int) -> float:
        """Exponential backoff before retry ``attempt``: base, 2 base, 4 base, ... up to the max."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        return float(min(self.backoff_max_s, self.backoff_base_s * 2 ** min(attempt - 1, 62)))

    def heartbeat(self, message: QueueMessage) -> bool:
        """Tell the queue ``message.consumer`` is still working on it (resets its idle time without
        counting a delivery). False if the consumer lost it to ``reclaim``: stop working on the job."""
        reply = self._run("heartbeat", [self._stream], self._group, message.id, message.consumer)
        return bool(reply[0])

    def reclaim(self, consumer: str, count: int = 100) -> list[QueueMessage]:
        """Take over messages idle longer than ``reclaim_idle_ms`` (their dispatcher died).

        A message delivered more than ``max_deliveries`` times is moved to the dead letters and acked
        instead of returned: the job it carries must be failed by the caller (see ``dead_letters``).
        """
        reply = self._run(
            "reclaim",
            [self._stream, self._dead],
            self._group,
            consumer,
            self.reclaim_idle_ms,
            count,
            self.max_deliveries,
        )
        return [
            QueueMessage(
                id=_text(message_id), job_id=_text(job_id), deliveries=int(n), consumer=consumer
            )
            for message_id, job_id, n in reply
        ]

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first.

        The queue can't touch job records, so their jobs are still ``queued``/``running`` in the store:
        the dispatcher fails each one that isn't terminal yet (``start_attempt`` to fence out any
        zombie, then ``finish(FAILED, JobError(...))``), which makes a repeated sweep harmless.
        """
        raw = cast(list[Any], self._redis.lrange(self._dead, 0, -1))
        letters = []
        for item in raw:
            data = json.loads(_text(item))
            data["dead_at"] = _from_ms(data.pop("at"))
            letters.append(DeadLetter.model_validate(data))
        return letters

    def depth(self) -> int:
        """Jobs waiting, in flight (delivered, not acked) or delayed for a retry."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.xlen(self._stream)
        pipe.zcard(self._delayed)
        stream_len, delayed = pipe.execute()
        return int(stream_len) + int(delayed)

    # ---- helpers --------------------------------------------------------------------------------

    def _ensure_group(self) -> None:
        # From id 0, so jobs the API enqueued before any dispatcher started are delivered too.
        try:
            self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def _promote_due(self) -> int | None:
        """Move due retries into the stream; ms until the next one is due (None if none waits)."""
        reply = self._run("promote", [self._stream, self._delayed], 100)
        wait_ms = int(reply[0])
        return None if wait_ms < 0 else wait_ms

    def _read_new(self, consumer: str, count: int, block_ms: int | None) -> list[QueueMessage]:
        response = self._with_group(
            lambda: self._redis.xreadgroup(
                self._group, consumer, {self._stream: ">"}, count=count, block=block_ms
            )
        )
        return [
            QueueMessage(
                id=_text(message_id),
                job_id=_text(fields.get(b"job_id", fields.get("job_id"))),
                deliveries=1,
                consumer=consumer,
            )
            for message_id, fields in _stream_entries(response)
        ]

    def _with_group(self, command: Callable[[], _T]) -> _T:
        """Run a command that needs the consumer group, creating the group if Redis doesn't have it
        (first use, or Redis came back without its data): a missing group has nothing pending, so
        creating it then loses nothing."""
        try:
            return command()
        except ResponseError as error:
            if not _is_missing_group(error):
                raise
        self._ensure_group()
        return command()

    def _run(self, script: str, keys: list[str], *args: str | int) -> list[Any]:
        run = self._scripts[script]
        return cast(list[Any], self._with_group(lambda: run(keys=keys, args=list(args))))


def _is_missing_group(error: ResponseError) -> bool:
    """Redis answers NOGROUP; the embedded mode's in-process Redis (fakeredis) words a missing
    stream in XREADGROUP as a note about XGROUP needing the key."""
    message = str(error)
    return "NOGROUP" in message or "requires the key to exist" in message


def _text(value: Any) -> str:
    """Replies are bytes unless the client was made with ``decode_responses=True``; accept both."""
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _from_ms(ms: Any) -> datetime:
    millis = int(ms)
    return datetime.fromtimestamp(millis // 1000, UTC) + timedelta(milliseconds=millis % 1000)


def _stream_entries(response: Any) -> list[tuple[Any, dict[Any, Any]]]:
    """(id, fields) pairs from an XREAD(GROUP) reply, in RESP2 (list) or RESP3 (dict) shape."""
    if not response:
        return []
    streams = response.values() if isinstance(response, dict) else [s[1] for s in response]
    entries: list[tuple[Any, dict[Any, Any]]] = []
    for stream in streams:
        items = stream[0] if stream and isinstance(stream[0], list) else stream
        entries.extend((entry_id, fields) for entry_id, fields in items if fields is not None)
    return entries


_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- whether consumer holds message id in group (the pending entry's owner)
local function holds(stream, group, id, consumer)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return #p == 1 and p[1][2] == consumer
end
"""

_SCRIPTS: dict[str, str] = {
    # KEYS: stream, delayed. ARGV: job id, max depth. -> {1, message id} | {0, depth}
    "enqueue": """
local depth = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if depth >= tonumber(ARGV[2]) then return {0, depth} end
return {1, redis.call('XADD', KEYS[1], '*', 'job_id', ARGV[1])}
""",
    # KEYS: stream, delayed. ARGV: most to move. -> {ms until the next due retry, or -1}
    "promote": """
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, job_id in ipairs(due) do
  redis.call('ZREM', KEYS[2], job_id)
  redis.call('XADD', KEYS[1], '*', 'job_id', job_id)
end
local next = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #next == 0 then return {-1} end
return {math.max(0, tonumber(next[2]) - now)}
""",
    # KEYS: stream. ARGV: group, message id, consumer. -> {1} | {0}
    "ack": """
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return {0} end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return {1}
""",
    # KEYS: stream, delayed. ARGV: group, message id, consumer, job id, delay ms. -> {1} | {0}
    "retry_later": """
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return {0} end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[5]), ARGV[4])
return {1}
""",
    # KEYS: stream. ARGV: group, message id, consumer. -> {1} | {0}
    "heartbeat": """
if not holds(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return {0} end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return {1}
""",
    # KEYS: stream, dead. ARGV: group, consumer, min idle ms, count, max deliveries.
    # -> {{message id, job id, deliveries}, ...} for the messages taken over (dead ones left out)
    "reclaim": """
local group, consumer = ARGV[1], ARGV[2]
local claimed = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, ARGV[3], '0-0', 'COUNT', ARGV[4])
local out = {}
for _, entry in ipairs(claimed[2]) do
  local id, fields = entry[1], entry[2]
  local job_id = ''
  for i = 1, #fields, 2 do
    if fields[i] == 'job_id' then job_id = fields[i + 1] end
  end
  local deliveries = redis.call('XPENDING', KEYS[1], group, id, id, 1)[1][4]
  if deliveries > tonumber(ARGV[5]) then
    redis.call('RPUSH', KEYS[2], cjson.encode(
      {message_id = id, job_id = job_id, deliveries = deliveries, at = now_ms()}))
    redis.call('XACK', KEYS[1], group, id)
    redis.call('XDEL', KEYS[1], id)
  else
    table.insert(out, {id, job_id, deliveries})
  end
end
return out
""",
}
