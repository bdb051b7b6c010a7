"""The job state machine and models, without Redis."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from services.common.jobs import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATUSES,
    InvalidTransition,
    JobKind,
    JobProgress,
    JobRecord,
    JobStatus,
    Stage,
    check_transition,
    is_job_id,
    new_job_id,
)

EXPECTED_MOVES = {
    ("queued", "running"),
    ("queued", "canceled"),
    ("queued", "failed"),
    ("running", "running"),
    ("running", "succeeded"),
    ("running", "failed"),
    ("running", "canceled"),
    ("running", "queued"),
}


def test_table_is_exactly_the_documented_state_machine():
    table = {
        (old.value, new.value) for old, targets in ALLOWED_TRANSITIONS.items() for new in targets
    }
    assert table == EXPECTED_MOVES
    assert set(ALLOWED_TRANSITIONS) == set(JobStatus)


@pytest.mark.parametrize("old, new", sorted(EXPECTED_MOVES))
def test_allowed_moves_pass(old: str, new: str):
    check_transition(old, new)
    check_transition(JobStatus(old), JobStatus(new))


@pytest.mark.parametrize(
    "old, new",
    sorted(
        (old.value, new.value)
        for old, new in itertools.product(JobStatus, JobStatus)
        if (old.value, new.value) not in EXPECTED_MOVES
    ),
)
def test_every_other_move_is_refused_naming_both(old: str, new: str):
    with pytest.raises(InvalidTransition) as raised:
        check_transition(old, new)
    assert (raised.value.old, raised.value.new) == (old, new)
    assert repr(old) in str(raised.value) and repr(new) in str(raised.value)


def test_terminal_states_go_nowhere():
    assert {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED} == TERMINAL_STATUSES
    for status in TERMINAL_STATUSES:
        assert not ALLOWED_TRANSITIONS[status]


def test_unknown_status_is_an_invalid_transition_not_a_bare_value_error():
    with pytest.raises(InvalidTransition, match="'paused'"):
        check_transition("running", "paused")


def test_job_ids_are_ulids_that_sort_by_creation_time():
    earlier, later = new_job_id(now_ms=1_700_000_000_000), new_job_id(now_ms=1_700_000_000_001)
    assert is_job_id(earlier) and is_job_id(later)
    assert len(earlier) == len("job_") + 26
    assert earlier < later
    assert new_job_id() != new_job_id()
    assert not is_job_id("job_../../etc") and not is_job_id("job_" + "I" * 26)


def test_progress_counters_are_the_int_fields():
    assert JobProgress.counter_names() == (
        "images_generated",
        "images_kept",
        "blocks_reconstructed",
    )
    progress = JobProgress.model_validate(
        {"stages": {"generating": {"done": 2, "total": 8}}, "images_kept": 1}
    )
    assert progress.stages[Stage.GENERATING].done == 2


def test_record_round_trips_through_json():
    now = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    record = JobRecord(
        id=new_job_id(),
        tenant="acme",
        kind=JobKind.GENQ,
        status=JobStatus.QUEUED,
        created_at=now,
        updated_at=now,
        config={"bits": {"w": 4, "a": 4}},
    )
    assert JobRecord.model_validate_json(record.model_dump_json()) == record
    assert not record.is_terminal
