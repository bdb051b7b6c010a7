"""Progress and cancellation: the callbacks every long-running step of ``genq_core`` takes.

``on_progress(stage, done, total)`` reports work in the stage's own unit (images, steps); it is
called often, so it must be cheap. ``should_stop()`` is polled between batches or blocks; when it
returns True the step raises a :class:`Canceled` subclass and leaves nothing half-written behind
that a rerun would mistake for a finished result.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Canceled", "ProgressFn", "StopFn", "check_stop"]

ProgressFn = Callable[[str, int, int], None]
StopFn = Callable[[], bool]


class Canceled(RuntimeError):
    """``should_stop()`` returned True; the step stopped between two units of work."""


def check_stop(should_stop: StopFn | None, where: str, error: type[Canceled] = Canceled) -> None:
    """Raise ``error`` naming ``where`` if ``should_stop()`` says so."""
    if should_stop is not None and should_stop():
        raise error(f"canceled {where}")
