"""The final outcome of an execution whose worker exited, decided from its record."""

from __future__ import annotations

from zmqruntime._execution import STREAM_END_GRACE, ExecutionRecord, final_outcome


def _exited(**fields: object) -> ExecutionRecord:
    record = ExecutionRecord("e1", "r1", exitcode=0, exited_at=100.0)
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def test_final_outcome_cancel_wins_over_success() -> None:
    record = _exited(cancel_requested=True, outcome={"status": "completed"}, stream_ended=True)

    assert final_outcome(record, 100.0) == ("cancelled", None)


def test_final_outcome_crash_without_report() -> None:
    status, error = final_outcome(_exited(exitcode=-9), 100.0) or ("", None)

    assert status == "failed"
    assert error is not None
    assert error["type"] == "WorkerCrashed"


def test_final_outcome_waits_for_stream_end_within_grace() -> None:
    record = _exited(outcome={"status": "completed"})

    assert final_outcome(record, 100.0 + STREAM_END_GRACE / 2) is None


def test_final_outcome_missing_stream_end_after_grace() -> None:
    record = _exited(outcome={"status": "completed"})

    status, error = final_outcome(record, 100.0 + STREAM_END_GRACE + 1) or ("", None)

    assert status == "failed"
    assert error is not None
    assert error["type"] == "IncompleteStream"


def test_final_outcome_completed_with_stream_end() -> None:
    record = _exited(outcome={"status": "completed"}, stream_ended=True)

    assert final_outcome(record, 100.0) == ("completed", None)
