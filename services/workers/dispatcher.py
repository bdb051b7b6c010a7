"""The dispatcher: reads the job queue and runs each job on a pool of warm workers.

One dispatcher process holds a pool of :class:`~services.workers.actors.GenQWorker` actors (Ray
actors in the distributed mode, :class:`InlinePool` threads in the embedded mode and fast tests)
and loops (:meth:`Dispatcher.step`, numbered steps):

1. collect the calls that ended and move their jobs on;
2. heartbeat the queue messages of the jobs it holds (a third of ``reclaim_idle_ms``), so no other
   dispatcher reclaims them; a lost heartbeat means another dispatcher took the job over, and
   this one stops writing for it;
3. record the outcome of each job whose calls are all back (the runner's contract: a result ->
   ``succeeded``; ``Canceled`` -> ``canceled``; ``StaleAttempt`` -> nothing, no ack; an error ->
   ``failed``, or requeued with backoff when retryable, at most ``max_attempts`` attempts);
4. sweep now and then: dead letters' jobs are failed, jobs whose enqueue was lost are enqueued;
5. take new work while it holds fewer jobs than actors: abandoned messages first (``reclaim``),
   then new ones; each gets a new attempt (``start_attempt``, the fencing token);
6. give idle actors to the jobs that want one, the job holding the fewest actors first.

A ``genq``/``generate`` job runs in three phases: one actor plans its generation shards
(``plan_generation``), the shards fan out over every actor the job may have (``generate_shard``,
written straight to object storage), then one actor runs the remaining stages (``run_job``: it
finds every shard done, gathers them, filters, quantizes, evaluates, uploads). A ``quantize`` job
has nothing to plan and goes straight to ``run_job``.

Fairness: step 6 is max-min fair. An idle actor goes to the job that holds the fewest actors
(round-robin among equals), so while several jobs want actors none holds more than its share,
and a job alone in the pool takes every actor for its shards. Shards are short (``shard_images``
images), so a job arriving later gets its share as soon as shards end; a job never waits for
another job's whole generation.

Only ids travel to the actors; images and models go through object storage. The dispatcher
itself never touches object storage and loads no model.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, MutableMapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import Field
from redis import Redis
from redis.exceptions import RedisError

from genq_core.progress import ProgressFn
from services.common.jobs import InvalidTransition, JobError, JobStatus, Stage
from services.common.jobstore import JobNotFound, JobStore, StaleAttempt
from services.common.queue import JobQueue, QueueMessage
from services.workers.actors import ActorMethod, GenQWorker, Outcome
from services.workers.settings import WorkerSettings
from services.workers.storage import Storages
from services.workers.sweeps import fail_dead_letters, requeue_lost_jobs

__all__ = ["Dispatcher", "DispatcherSettings", "InlinePool", "WorkerPool"]

logger = logging.getLogger(__name__)

Phase = Literal["planning", "sharding", "running"]


class DispatcherSettings(WorkerSettings):
    """The worker settings plus the dispatcher's loop and queue settings (``GENQ_<FIELD>``).

    ``reclaim_idle_ms``, ``max_deliveries`` and the backoff go to the :class:`JobQueue` the
    dispatcher reads (:meth:`make_queue`); every dispatcher of a deployment should agree on them.
    """

    consumer: str | None = Field(
        default=None,
        description="this dispatcher's consumer name in the queue's group (default host-pid)",
    )
    poll_s: float = Field(
        default=0.5, gt=0.0, le=10.0, description="longest one loop step waits for something"
    )
    max_attempts: int = Field(
        default=5, ge=1, description="attempts of a job before a retryable error fails it"
    )
    reclaim_idle_ms: int = Field(
        default=60_000,
        ge=100,
        description="a message not heartbeated this long belongs to a dead dispatcher",
    )
    max_deliveries: int = Field(
        default=3, ge=1, description="deliveries of one message before it is a dead letter"
    )
    retry_backoff_base_s: float = Field(
        default=5.0, gt=0.0, description="first retry of a failed job waits about this long"
    )
    retry_backoff_max_s: float = Field(
        default=600.0, gt=0.0, description="longest wait between retries (doubling from the base)"
    )
    sweep_every_s: float = Field(
        default=30.0,
        gt=0.0,
        description="how often dead letters and jobs without a queue message are swept",
    )
    lost_enqueue_after_s: float = Field(
        default=120.0,
        ge=0.0,
        description="a queued or running job untouched this long and without a queue message is "
        "enqueued again",
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0.0,
        description="on SIGTERM: how long running jobs may go on before they are requeued",
    )

    def make_queue(self, redis: Redis) -> JobQueue:
        """The job queue with this dispatcher's reclaim, dead-letter and backoff settings."""
        return JobQueue(
            redis,
            self.redis_prefix,
            reclaim_idle_ms=self.reclaim_idle_ms,
            max_deliveries=self.max_deliveries,
            backoff_base_s=self.retry_backoff_base_s,
            backoff_max_s=max(self.retry_backoff_max_s, self.retry_backoff_base_s),
        )


class WorkerPool(Protocol):
    """Workers addressed by index ``0 .. size-1``, each running one call at a time.

    ``submit`` queues a call on one worker and returns a future of its
    :class:`~services.workers.actors.Outcome`; the future raises only when the worker itself
    failed (a dead Ray actor). Implemented by :class:`InlinePool` and
    :class:`~services.workers.actors.RayPool`.
    """

    @property
    def size(self) -> int: ...

    def submit(self, actor: int, method: ActorMethod, *args: Any) -> Future[Outcome]: ...

    def healthy(self, actor: int) -> bool:
        """Whether the worker can take a call (a restarting Ray actor can't)."""
        ...

    def close(self) -> None: ...


class InlinePool:
    """Workers in this process, each with one thread: the embedded mode and the fast tests.

    The workers are the same :class:`GenQWorker` the Ray actors host, so everything but the
    process boundary is exercised. A call can't be interrupted: ``close`` waits for running ones.
    """

    def __init__(self, workers: Sequence[GenQWorker]) -> None:
        if not workers:
            raise ValueError("an inline pool needs at least one worker")
        self.workers = list(workers)
        self._threads = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"genq-worker-{index}")
            for index in range(len(self.workers))
        ]

    @classmethod
    def create(
        cls,
        settings: WorkerSettings,
        size: int | None = None,
        *,
        storages: Storages | None = None,
        observer: ProgressFn | None = None,
    ) -> InlinePool:
        """``size`` workers (default ``settings.num_actors``), each with its own Redis client."""
        count = settings.num_actors if size is None else size
        return cls(
            [GenQWorker(settings, storages=storages, observer=observer) for _ in range(count)]
        )

    @property
    def size(self) -> int:
        return len(self.workers)

    def submit(self, actor: int, method: ActorMethod, *args: Any) -> Future[Outcome]:
        """Queue ``method(*args)`` on worker ``actor``'s thread."""
        call: Callable[..., Outcome] = getattr(self.workers[actor], method)
        return self._threads[actor].submit(call, *args)

    def healthy(self, actor: int) -> bool:
        """Always: a thread of this process can't die on its own."""
        return True

    def close(self) -> None:
        """Wait for the running calls, then close the workers."""
        for thread in self._threads:
            thread.shutdown(wait=True, cancel_futures=True)
        for worker in self.workers:
            worker.close()


class Dispatcher:
    """Runs queued jobs on a pool of workers; see the module docstring for the loop.

    Args:
        settings: the dispatcher settings (consumer name, loop timing, attempts, sweeps).
        redis: the client for the sweeps (the same server as ``store`` and ``queue``).
        store: the job store (attempts, stages, progress, outcomes).
        queue: the job queue (``settings.make_queue(redis)``); its ``reclaim_idle_ms`` sets the
            heartbeat interval.
        pool: the workers; at most ``pool.size`` jobs are in flight at once.

    ``run()`` loops until ``stop()`` (e.g. from a SIGTERM handler), then shuts down gracefully;
    tests may call ``step()`` themselves.
    """

    def __init__(
        self,
        settings: DispatcherSettings,
        redis: Redis,
        store: JobStore,
        queue: JobQueue,
        pool: WorkerPool,
    ) -> None:
        self.settings = settings
        self.consumer = settings.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._redis = redis
        self._store = store
        self._queue = queue
        self._pool = pool
        self._heartbeat_s = queue.reclaim_idle_ms / 3000
        self._reclaim_s = queue.reclaim_idle_ms / 2000
        self._jobs: dict[str, _Job] = {}
        self._calls: dict[Future[Outcome], _Call] = {}
        self._busy: set[int] = set()
        self._tick = 0
        self._stopping = threading.Event()
        self._dead_letters_seen: set[str] = set()
        now = time.monotonic()
        self._next_heartbeat = now + self._heartbeat_s
        self._next_reclaim = now
        self._next_sweep = now

    @property
    def job_ids(self) -> list[str]:
        """The jobs this dispatcher holds now."""
        return list(self._jobs)

    def run(self) -> None:
        """Loop until :meth:`stop`, then let running jobs finish for ``shutdown_grace_s`` and
        requeue the rest (they resume from their last finished stage elsewhere)."""
        logger.info(
            "dispatcher %s: %d workers, reclaim after %d ms",
            self.consumer,
            self._pool.size,
            self._queue.reclaim_idle_ms,
        )
        while not self._stopping.is_set():
            self._guarded_step()
        self.shutdown(self.settings.shutdown_grace_s)

    def stop(self) -> None:
        """Ask :meth:`run` to stop taking work and shut down (safe from a signal handler)."""
        self._stopping.set()

    def step(self) -> None:
        """One round of the loop: collect, heartbeat, record, sweep, take work, assign actors."""
        # 1. collect the calls that ended (waiting for one, but never past the next heartbeat)
        now = time.monotonic()
        wait_s = min(self.settings.poll_s, max(0.0, self._next_heartbeat - now))
        self._collect(wait_s if self._calls else 0.0)

        # 2. keep the messages of held jobs alive; a lost one means another dispatcher owns it
        if time.monotonic() >= self._next_heartbeat:
            self._heartbeat()

        # 3. record the outcome of each job whose calls are all back
        for job in list(self._jobs.values()):
            if job.calls == 0 and (job.lost or job.final is not None):
                self._conclude(job)

        # 4. repairs: dead letters' jobs fail, jobs whose enqueue was lost are enqueued again
        if time.monotonic() >= self._next_sweep and not self._stopping.is_set():
            self._sweep()

        # 5. take new work while there are fewer jobs than actors (waiting for it if idle)
        waited = False
        if not self._stopping.is_set():
            waited = self._take_work(block=not self._calls)

        # 6. give idle actors to the jobs that want them, fewest held first
        self._assign()
        if not self._calls and not waited:  # nothing to wait on (e.g. actors restarting)
            time.sleep(self.settings.poll_s)

    def shutdown(self, grace_s: float) -> None:
        """Stop taking work; run the held jobs for up to ``grace_s``, then requeue the rest.

        A requeued job goes back to ``queued`` with a ``worker_shutdown`` error and is delivered
        again after the queue's base backoff; the calls still running for it can no longer write
        (its status is not ``running``) and a new attempt fences them out for good.
        """
        self._stopping.set()
        deadline = time.monotonic() + grace_s
        while self._jobs and time.monotonic() < deadline:
            self._guarded_step()
        error = JobError(
            code="worker_shutdown",
            message="the worker shut down; the job resumes from its last finished stage",
            retryable=True,
        )
        for job in list(self._jobs.values()):
            if not job.lost:
                if job.final is None or job.calls > 0:  # still running: back to the queue
                    job.final = Outcome("failed", error=error)
                try:
                    self._record(job, shutting_down=True)
                except RedisError as err:  # its message stays pending: reclaimed later
                    job.log.warning("could not record its outcome on shutdown: %s", err)
            self._drop(job)
        logger.info("dispatcher %s stopped", self.consumer)

    # ---- the steps ----------------------------------------------------------------------------

    def _guarded_step(self) -> None:
        """``step()``, surviving a Redis outage: wait a little and go on."""
        try:
            self.step()
        except RedisError as err:
            logger.warning("dispatcher %s: Redis unavailable: %s", self.consumer, err)
            time.sleep(min(1.0, self.settings.poll_s * 2))

    def _collect(self, wait_s: float) -> None:
        if not self._calls:
            return
        done, _ = wait(list(self._calls), timeout=wait_s, return_when=FIRST_COMPLETED)
        for future in done:
            call = self._calls.pop(future)
            self._busy.discard(call.actor)
            call.job.calls -= 1
            try:
                outcome = future.result()
            except Exception as err:  # the worker itself failed: a dead Ray actor, a lost node
                message = f"the worker running it stopped: {type(err).__name__}: {err}"
                outcome = Outcome(
                    "failed", error=JobError(code="worker_lost", message=message, retryable=True)
                )
            self._advance(call, outcome)

    def _advance(self, call: _Call, outcome: Outcome) -> None:
        """Move a job on after one of its calls ended."""
        job = call.job
        if job.lost:
            return  # another dispatcher owns it: nothing to do but wait for the other calls
        if call.method == "plan_generation":
            pending = outcome.value.get("pending", []) if outcome.status == "ok" else []
            if outcome.status != "ok":
                job.final = outcome
            elif pending:
                job.phase = "sharding"
                job.pending = deque(pending)
                job.images = int(outcome.value["images"])
                job.images_done = int(outcome.value["images_done"])
                job.log.info(
                    "generation: %d of %d shards to make (%d images)",
                    len(pending),
                    outcome.value["shards"],
                    job.images - job.images_done,
                )
                self._write(job, lambda: self._store.set_stage(job.id, job.token, Stage.GENERATING))
                self._report_generation(job)
            else:
                job.phase, job.waiting = "running", True
        elif call.method == "generate_shard":
            if outcome.status == "ok":
                job.images_done += int(outcome.value["images"])
                job.nodes.add(outcome.node_id)
                job.log.info(
                    "shard %d done on node %s in %.1f s",
                    call.shard,
                    outcome.node_id,
                    outcome.seconds,
                    extra={"shard": call.shard, "node_id": outcome.node_id, "actor": call.actor},
                )
                self._report_generation(job)
            elif job.failure is None:
                job.failure = outcome
                job.pending.clear()  # the job ends (or retries): start no more shards
            if not job.pending and job.calls == 0:
                if job.failure is not None:
                    job.final = job.failure
                else:
                    job.log.info("generation gathered from %d node(s)", len(job.nodes))
                    job.phase, job.waiting = "running", True
        else:
            job.final = outcome

    def _heartbeat(self) -> None:
        self._next_heartbeat = time.monotonic() + self._heartbeat_s
        for job in self._jobs.values():
            if job.lost:
                continue
            if not self._queue.heartbeat(job.message):
                job.lost = True
                job.pending.clear()
                job.log.warning("lost its queue message to another dispatcher; stops here")

    def _conclude(self, job: _Job) -> None:
        """Record a finished job's outcome and forget it (kept for a retry if Redis fails)."""
        if job.lost:
            job.log.info("dropped (another dispatcher owns it)")
            self._drop(job)
            return
        try:
            self._record(job)
        except RedisError as err:
            job.log.warning("could not record the outcome yet: %s", err)
            return
        self._drop(job)

    def _record(self, job: _Job, *, shutting_down: bool = False) -> None:
        """The runner's contract: finish, requeue (and schedule the retry) or leave the job.

        ``shutting_down``: a failure is this dispatcher's shutdown, not the job's; it is retried
        after the base backoff whatever the attempt, instead of counting towards the limit.
        """
        outcome = job.final
        assert outcome is not None
        store, queue, message = self._store, self._queue, job.message
        try:
            if outcome.status == "ok":
                store.finish(job.id, job.token, JobStatus.SUCCEEDED, result=outcome.value)
                queue.ack(message)
                job.log.info("succeeded")
            elif outcome.status == "canceled":
                store.finish(job.id, job.token, JobStatus.CANCELED)
                queue.ack(message)
                job.log.info("canceled")
            elif outcome.status == "stale":
                job.log.info("a newer attempt owns the job; leaving it")
            elif outcome.status == "gone":
                queue.ack(message)
                job.log.info("no longer runs (finished or removed elsewhere)")
            else:
                self._record_failure(job, outcome.error, shutting_down)
        except StaleAttempt:
            job.log.info("a newer attempt owns the job; leaving it")
        except (InvalidTransition, JobNotFound) as err:
            queue.ack(message)
            job.log.info("no longer runs: %s", err)

    def _record_failure(self, job: _Job, error: JobError | None, shutting_down: bool) -> None:
        error = error or JobError(code="worker_error", message="unknown error", retryable=True)
        store, queue, message = self._store, self._queue, job.message
        out_of_attempts = job.token >= self.settings.max_attempts and not shutting_down
        if not error.retryable or out_of_attempts:
            if error.retryable:
                message_text = f"{error.message} (gave up after {job.token} attempts)"
                error = error.model_copy(update={"message": message_text})
            store.finish(job.id, job.token, JobStatus.FAILED, error=error)
            queue.ack(message)
            job.log.warning("failed (%s): %s", error.code, error.message)
            return
        status = store.requeue(job.id, job.token, error)
        if status != JobStatus.QUEUED:  # canceled meanwhile: it never runs again
            queue.ack(message)
            job.log.info("canceled while failing (%s)", error.code)
            return
        backoff_attempt = 1 if shutting_down else job.token
        queue.retry_later(message, backoff_attempt)
        delay = queue.backoff_s(backoff_attempt)
        job.log.warning("requeued (%s), retry in %.1f s: %s", error.code, delay, error.message)

    def _sweep(self) -> None:
        self._next_sweep = time.monotonic() + self.settings.sweep_every_s
        fail_dead_letters(self._store, self._queue, self._dead_letters_seen)
        older_than_ms = int(self.settings.lost_enqueue_after_s * 1000)
        requeue_lost_jobs(self._redis, self.settings.redis_prefix, older_than_ms)

    def _take_work(self, block: bool) -> bool:
        """Reclaim and read up to the free slots; whether it blocked waiting for messages."""
        free = self._pool.size - len(self._jobs)
        if free <= 0:
            return False
        messages: list[QueueMessage] = []
        block_ms: int | None = None
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + self._reclaim_s
            messages += self._queue.reclaim(self.consumer, count=free)
        if len(messages) < free:
            block_ms = int(self.settings.poll_s * 1000) if block and not messages else None
            messages += self._queue.read(
                self.consumer, count=free - len(messages), block_ms=block_ms
            )
        for message in messages:
            self._start(message)
        return block_ms is not None

    def _start(self, message: QueueMessage) -> None:
        """A new attempt for a delivered message (dropped if the job can't run any more)."""
        log = _JobLog(logger, {"job_id": message.job_id})
        held = self._jobs.get(message.job_id)
        if held is not None and held.message.id == message.id:
            # its own message, reclaimed by itself after heartbeats came late (a stalled step):
            # it still holds the job; acking here would lose it at the next heartbeat
            held.message = message
            held.log.warning(
                "took its own message back after a late heartbeat (delivery %d)", message.deliveries
            )
            return
        if held is not None:  # a duplicate message (a lost enqueue raced the API)
            self._queue.ack(message)
            log.warning("dropped a second message for a job this dispatcher runs")
            return
        try:
            token = self._store.start_attempt(message.job_id)
        except (InvalidTransition, JobNotFound) as err:  # canceled while queued, or gone
            self._queue.ack(message)
            log.info("dropped its message: %s", err)
            return
        job = _Job(message, token, _JobLog(logger, {"job_id": message.job_id, "attempt": token}))
        self._jobs[job.id] = job
        job.log.info("attempt %d started (delivery %d)", token, message.deliveries)

    def _assign(self) -> None:
        idle = [
            actor
            for actor in range(self._pool.size)
            if actor not in self._busy and self._pool.healthy(actor)
        ]
        while idle:
            wanting = [job for job in self._jobs.values() if job.wants() > 0]
            if not wanting:
                return
            # max-min fairness: the job holding the fewest actors, the least recently served
            job = min(wanting, key=lambda j: (j.calls, j.served_at))
            actor = next((a for a in idle if a in job.actors_used), idle[0])  # warm for it
            idle.remove(actor)
            self._place(job, actor)

    def _place(self, job: _Job, actor: int) -> None:
        self._tick += 1
        job.served_at = self._tick
        shard: int | None = None
        method: ActorMethod
        args: tuple[Any, ...]
        if job.phase == "sharding":
            shard = job.pending.popleft()
            method, args = "generate_shard", (job.id, job.token, shard)
        else:
            method = "plan_generation" if job.phase == "planning" else "run_job"
            args = (job.id, job.token)
            job.waiting = False
        try:
            future = self._pool.submit(actor, method, *args)
        except Exception as err:  # the pool could not even queue it: a failed call
            future = Future()
            error = JobError(code="worker_lost", message=f"{type(err).__name__}: {err}")
            future.set_result(Outcome("failed", error=error.model_copy(update={"retryable": True})))
        self._calls[future] = _Call(job, actor, method, shard)
        self._busy.add(actor)
        job.calls += 1
        job.actors_used.add(actor)
        job.log.debug(
            "%s on actor %d", method, actor, extra={"actor": actor, "shard": shard, "call": method}
        )

    # ---- helpers --------------------------------------------------------------------------------

    def _report_generation(self, job: _Job) -> None:
        """The gathered images so far, as the generating stage's progress (the shards don't
        write to the job store; the dispatcher sums them)."""
        self._write(
            job,
            lambda: self._store.update_progress(
                job.id,
                job.token,
                stage=Stage.GENERATING,
                done=job.images_done,
                total=job.images,
                images_generated=job.images_done,
            ),
        )

    def _write(self, job: _Job, write: Callable[[], object]) -> None:
        """A store write on behalf of a job's attempt; its failures decide the job's fate."""
        if job.lost:
            return
        try:
            write()
        except StaleAttempt:
            job.lost = True
            job.pending.clear()
            job.log.info("a newer attempt owns the job; stops here")
        except (InvalidTransition, JobNotFound) as err:
            job.pending.clear()
            job.final = job.final or Outcome("gone")
            job.failure = job.failure or Outcome("gone")
            job.log.info("no longer runs: %s", err)
        except RedisError as err:  # progress is advisory; the next write catches up
            job.log.warning("could not write progress: %s", err)

    def _drop(self, job: _Job) -> None:
        self._jobs.pop(job.id, None)


@dataclass(eq=False)
class _Job:
    """A job this dispatcher holds: its message, attempt, phase and the actors it uses."""

    message: QueueMessage
    token: int
    log: _JobLog
    phase: Phase = "planning"
    waiting: bool = True  # the phase's one call (plan, run) still needs an actor
    pending: deque[int] = field(default_factory=deque)  # shards not yet placed
    calls: int = 0  # calls in flight = actors held
    actors_used: set[int] = field(default_factory=set)
    images: int = 0
    images_done: int = 0
    nodes: set[str] = field(default_factory=set)
    failure: Outcome | None = None  # the first shard that did not succeed
    final: Outcome | None = None  # what to record once every call is back
    lost: bool = False  # another dispatcher owns the job's message now
    served_at: int = 0  # when it last got an actor (round-robin among equals)

    @property
    def id(self) -> str:
        return self.message.job_id

    def wants(self) -> int:
        """How many more actors the job could use now."""
        if self.lost or self.final is not None:
            return 0
        if self.phase == "sharding":
            return 0 if self.failure is not None else len(self.pending)
        return 1 if self.waiting else 0


@dataclass(frozen=True, eq=False)
class _Call:
    job: _Job
    actor: int
    method: ActorMethod
    shard: int | None


class _JobLog(logging.LoggerAdapter[logging.Logger]):
    """Every line names the job (``job_id`` and ``attempt`` as record attributes, and in the
    text), merged with the call's own ``extra``."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"job {extra['job_id']}: {msg}", kwargs
