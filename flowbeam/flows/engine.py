"""The flow logic shared by every source: fragments of one flow key in, flow rows out.

Pure Python, no Beam: ``BuildFlows`` is a thin stateful shell around ``advance``, and the
packet aggregator uses ``split_rows`` for its rare slow path, so the rules live in one place.

Fragments (``flowbeam.flows.fragment``) of one key are cut into *rows* by these rules, applied
to the fragments sorted by first-seen time:

- a fragment starting ``idle_us`` or more after everything seen so far starts a new flow
  (idle timeout);
- a TCP flow that has ended (FIN from both sides, or an RST) and then sees a fragment starting
  with a pure SYN starts a new flow (the 5-tuple is being reused);
- a fragment starting ``active_us`` or more after the first packet of the current row starts a
  new row of the same flow (active timeout); that row keeps the flow's direction.

Because the rules only look at sorted fragments, the rows are the same whatever order the
fragments arrive in. ``advance`` also works incrementally (streaming): given the time ``now_us``
up to which the input is complete (the watermark), it emits only the rows no later fragment
can change and keeps the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from flowbeam.flows.fragment import (
    NO_TIME,
    SIDE_A,
    Continuation,
    FlowKey,
    Fragment,
    initiator,
    merge,
)
from flowbeam.flows.protocols import TCP_FIN, TCP_RST

IDLE_TIMEOUT = "idle_timeout"
ACTIVE_TIMEOUT = "active_timeout"
END_OF_FLOW = "end_of_flow"
FORCED_END = "forced_end"


class EmittedRow(NamedTuple):
    """One row the engine emitted: a merged fragment, who initiated it, and why it was emitted."""

    fragment: Fragment
    src_side: int
    status: str


def has_ended(a_flags: int, b_flags: int) -> bool:
    """TCP end of flow: FIN sent by both sides, or an RST by either."""
    return bool((a_flags & b_flags & TCP_FIN) or ((a_flags | b_flags) & TCP_RST))


def closing_status(a_flags: int, b_flags: int) -> str:
    """Why a flow's last row is emitted when no later fragment belongs to it."""
    return END_OF_FLOW if has_ended(a_flags, b_flags) else IDLE_TIMEOUT


def starts_with_pure_syn(fragment: Fragment) -> bool:
    return fragment.syn_us != NO_TIME and fragment.syn_us == fragment.first_us


class _Row:
    """A row being assembled by ``split_rows``."""

    __slots__ = ("final_at", "fragments", "new_flow", "status")

    def __init__(self, first: Fragment, new_flow: bool) -> None:
        self.fragments = [first]
        self.new_flow = new_flow  # first row of its flow (False: continues after active timeout)
        self.status = ""
        self.final_at = 0  # time from which no later fragment can change this row


def split_rows(
    fragments: list[Fragment],
    idle_us: int,
    active_us: int,
    continuation: Continuation | None = None,
) -> list[_Row]:
    """Cut one key's fragments into rows by the module's rules; the last row stays open.

    Every row but the last gets its ``status`` and ``final_at``; the last row's status is
    decided by whoever closes it (``advance``).
    """
    ordered = sorted(fragments, key=_sort_order)
    rows: list[_Row] = []
    flow_last = continuation.last_us if continuation else NO_TIME
    a_flags = continuation.a_flags if continuation else 0
    b_flags = continuation.b_flags if continuation else 0
    row: _Row | None = None
    for f in ordered:
        if row is None:
            continues = continuation is not None and f.first_us - flow_last < idle_us and not (
                has_ended(a_flags, b_flags) and starts_with_pure_syn(f))
            if not continues:
                flow_last, a_flags, b_flags = NO_TIME, 0, 0
            row = _Row(f, new_flow=not continues)
            rows.append(row)
        elif f.first_us - flow_last >= idle_us:
            row.status = closing_status(a_flags, b_flags)
            row.final_at = flow_last + idle_us
            row = _Row(f, new_flow=True)
            rows.append(row)
            a_flags = b_flags = 0
        elif has_ended(a_flags, b_flags) and starts_with_pure_syn(f):
            row.status = END_OF_FLOW
            row.final_at = f.first_us
            row = _Row(f, new_flow=True)
            rows.append(row)
            a_flags = b_flags = 0
        elif f.first_us - row.fragments[0].first_us >= active_us:
            row.status = ACTIVE_TIMEOUT
            row.final_at = row.fragments[0].first_us + active_us
            row = _Row(f, new_flow=False)
            rows.append(row)
        else:
            row.fragments.append(f)
        flow_last = max(flow_last, f.last_us)
        a_flags |= f.a_flags
        b_flags |= f.b_flags
    if row is not None:
        row.status = closing_status(a_flags, b_flags)
        row.final_at = flow_last + idle_us
    return rows


def _sort_order(f: Fragment) -> tuple:
    return f[1:]


def advance(
    fragments: list[Fragment],
    idle_us: int,
    active_us: int,
    now_us: int | None,
    continuation: Continuation | None = None,
) -> tuple[list[EmittedRow], list[Fragment], Continuation | None, int | None]:
    """Emit the rows of one key that are final at ``now_us``; keep the rest.

    ``now_us`` is the time up to which the input is complete (the watermark); ``None`` means
    the input has ended, so every row is emitted. Returns the emitted rows, the fragments to
    keep, the continuation to keep (when an emitted active-timeout row's flow goes on), and the
    time at which something more could be emitted (``None`` when nothing is kept).
    """
    if now_us is None and continuation is None and len(fragments) == 1:
        return [_only_row(fragments[0])], [], None, None
    rows = split_rows(fragments, idle_us, active_us, continuation)
    emitted: list[EmittedRow] = []
    src_side = continuation.src_side if continuation else SIDE_A
    flow_flags = (continuation.a_flags, continuation.b_flags) if continuation else (0, 0)
    kept_from = len(rows)
    for index, row in enumerate(rows):
        if now_us is not None and row.final_at > now_us:
            kept_from = index
            break
        merged = merge(row.fragments)
        if row.new_flow:
            src_side = initiator(merged)
            flow_flags = (0, 0)
        flow_flags = (flow_flags[0] | merged.a_flags, flow_flags[1] | merged.b_flags)
        status = row.status
        if now_us is None and index == len(rows) - 1:
            status = _at_end_of_input(status, merged)
        emitted.append(EmittedRow(merged, src_side, status))
    if kept_from == len(rows):
        return emitted, [], None, None
    kept_rows = rows[kept_from:]
    new_continuation = None
    if not kept_rows[0].new_flow and not emitted:
        new_continuation = continuation  # nothing final yet: the flow goes on as it was
    elif not kept_rows[0].new_flow:
        last = emitted[-1].fragment
        new_continuation = Continuation(
            last.key, src_side,
            max(continuation.last_us if continuation else NO_TIME, last.last_us),
            flow_flags[0], flow_flags[1])
    kept = [part for row in kept_rows for part in _compact(row.fragments, now_us)]
    return emitted, kept, new_continuation, kept_rows[0].final_at


def advance_all(
    fragments: Iterable[Fragment], idle_us: int, active_us: int,
) -> list[EmittedRow]:
    """Batch: the rows of fragments of any keys once the input has ended, what
    ``advance(key_fragments, idle_us, active_us, None)`` emits for each key, keys in the order
    they first appear.

    Most keys of a batch run have one fragment: they get their row without a list of their own
    or a call of ``advance`` (grouping and ``advance`` were ~a fifth of a batch merge's cost).
    """
    first: dict[FlowKey, Fragment] = {}
    more: dict[FlowKey, list[Fragment]] = {}
    for fragment in fragments:
        seen = len(first)
        first.setdefault(fragment.key, fragment)
        if len(first) == seen:  # not the key's first fragment (the length, not identity, tells)
            more.setdefault(fragment.key, []).append(fragment)
    rows: list[EmittedRow] = []
    for key, fragment in first.items():
        extra = more.get(key) if more else None
        if extra is None:
            rows.append(_only_row(fragment))
        else:
            rows += advance([fragment, *extra], idle_us, active_us, None)[0]
    return rows


def _only_row(only: Fragment) -> EmittedRow:
    """The one row of a key whose one fragment is all its input (the input has ended): what
    the general path gives too. Built by ``tuple.__new__``, half the cost of the NamedTuple's
    own constructor (a batch run builds one per flow)."""
    status = _at_end_of_input(closing_status(only.a_flags, only.b_flags), only)
    return tuple.__new__(EmittedRow, (only, initiator(only), status))


def _at_end_of_input(status: str, last: Fragment) -> str:
    """The last row's status once the input has ended: a flow still within its idle timeout
    when its input ended was cut off (forced end), not timed out."""
    return FORCED_END if status == IDLE_TIMEOUT and last.open_at_end else status


def _compact(fragments: list[Fragment], now_us: int | None) -> list[Fragment]:
    """Merge the fragments of one row that started before ``now_us``.

    No fragment still to come can start before ``now_us``, so those fragments stay together
    in one row whatever arrives later: keeping them merged keeps state small without changing
    any future row.
    """
    settled = [f for f in fragments if now_us is not None and f.first_us < now_us]
    if len(settled) < 2:
        return fragments
    return [merge(settled)] + [f for f in fragments if not f.first_us < now_us]
