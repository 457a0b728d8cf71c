"""A volume's state on this node: the facts it depends on, and the one rule that names it.

Rules that hold here:

* Everything a volume's state depends on is a :class:`VolumeFacts`, plain values gathered in
  one place (:func:`marsfs.node.status.gather`); :func:`volume_state` turns them into a
  :class:`Verdict`: the state, the error lines that explain it and the operator's next
  command. No other code decides a state; ``status``, ``wait``, the command line and the
  handover's checks read the verdict. Nothing here reads a clock or does I/O.
* One precedence order for every role, the first condition that holds wins::

      failed > no-space > split-brain > needs-resync > syncing/resyncing > fenced
        > fetch-paused > replay-paused > disconnected/stalled > catching-up > synced (mirror) / up

  ``fenced`` concerns primaries (a mirror is always fenced: it refuses writes by being a
  mirror), ``syncing`` and everything after ``fenced`` mirrors. :attr:`Verdict.conditions`
  lists every state whose condition holds, in that order, so a check that must not miss one
  (a handover refuses a split brain even on a full disk) asks for it there.
* A copy becomes primary (a handover or a failover onto it) only when no state of
  :data:`NOT_PROMOTABLE` holds among its conditions: :func:`promotion_refusal` says why not.
* ``no-space`` means that space ran out: the state filesystem is full (writes fail with
  ENOSPC), or the node's log space is full and a mirror whose replay keeps its log stopped
  fetching (:attr:`marsfs.node.space.LogSpace.fetch_stopped`); its error line says which.
* A source's refusal code (a string, as the fetcher has it) becomes a state only through
  :func:`refusal_state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from marsfs.replication.session import STALL_AFTER, Stop, refusal_stop

FRESH = 1.5  #: a mirror is synced only on the word of a heartbeat at most this old (one per 0.5 s)


class Role(StrEnum):
    PRIMARY = "primary"
    MIRROR = "mirror"
    CLONE = "clone"  #: a local writable clone of a version (marsfs.volume.clone); its own primary


class VolumeState(StrEnum):
    """What ``status`` says a volume is doing on this node (the ``state`` field)."""

    UP = "up"  #: a primary serving writes
    FAILED = "failed"  #: the volume reported an error it cannot get past by itself
    #: space ran out: the state filesystem is full (writes fail with ENOSPC until there is room
    #: again), or the log space is full and this mirror stopped fetching until its replay lets
    #: log go; the error line says which
    NO_SPACE = "no-space"
    SYNCING = "syncing"  #: a mirror copying the image; not readable yet
    CATCHING_UP = "catching-up"  #: a mirror behind its source, or not sure it is not
    SYNCED = "synced"  #: a mirror with no lag, on the word of a fresh heartbeat
    REPLAY_PAUSED = "replay-paused"
    FETCH_PAUSED = "fetch-paused"
    DISCONNECTED = "disconnected"  #: no connection to the source right now
    STALLED = "stalled"  #: no progress for a while although there is something to do
    SPLIT_BRAIN = "split-brain"  #: the source refused: our histories diverged
    #: the source no longer holds the log we need, or the volume we copied at all (deleted
    #: there, maybe created anew: another uuid)
    NEEDS_RESYNC = "needs-resync"
    #: a primary that is not the designated primary (newest epoch) any more: refuses writes
    #: (EROFS) and keeps its log; it follows the designated primary once its log is a prefix
    FENCED = "fenced"
    #: a mirror bringing its image to its source's by fast sync (only blocks that differ);
    #: it keeps serving its last version until it switches
    RESYNCING = "resyncing"


#: States in which a mirror will not become synced without the operator (``wait`` gives up).
STOPPED = frozenset({VolumeState.FAILED, VolumeState.SPLIT_BRAIN, VolumeState.NEEDS_RESYNC})
#: States of a sync under way (``join --wait`` and ``invalidate --wait`` follow them).
SYNCS = frozenset({VolumeState.SYNCING, VolumeState.RESYNCING})


class FenceHolder(StrEnum):
    """Who refuses a volume's writes (each lifts only its own fence)."""

    DESIGNATION = "designation"  #: the cluster metadata names another primary (the follow step)
    MIRROR = "mirror"  #: a former primary turned mirror (lifted when it is primary again)
    HANDOVER = "handover"  #: a primary during its handover (marsfs.node.handover)


#: The state a mirror whose fetch stopped for good is in, by what the refusal meant (the
#: session's REFUSALS table); any other stop (fatal) is failed. A log-trimmed refusal that a
#: resync could not get past needs one by the operator.
STOP_STATES = {Stop.SPLIT_BRAIN: VolumeState.SPLIT_BRAIN, Stop.NEEDS_RESYNC: VolumeState.NEEDS_RESYNC,
               Stop.RESYNC: VolumeState.NEEDS_RESYNC}


def refusal_state(code: str) -> VolumeState:
    """The state a mirror is in when its source refused it for good with ``code``: a split
    brain, a resync, or failed (a refusal nobody can act on here, e.g. an unknown volume)."""
    return STOP_STATES.get(refusal_stop(code), VolumeState.FAILED)


@dataclass(frozen=True, slots=True)
class MirrorFacts:
    """What a mirror knows about its fetch and replay at one instant (a part of VolumeFacts)."""

    source: str
    fetching: bool  #: a fetcher runs for this volume
    fatal: str  #: a refusal code that stopped fetching ("" if none)
    error: str  #: the last fetch error, in words ("" if none)
    fetch_paused: bool
    replay_paused: bool
    connected: bool
    since_progress: float  #: seconds since the fetch last brought records (or connected)
    missing_records: int  #: records the source has durable that we have not fetched
    lag_records: int  #: missing_records plus fetched records not yet replayed
    heartbeat_age: float | None  #: how old the source's newest word is at most; None: no word yet
    resyncing: bool = False  #: a fast sync runs (or is staged and waits for the source)
    sync_waiting: str = ""  #: a fast sync is done and its switch waits, for this reason


@dataclass(frozen=True, slots=True)
class VolumeFacts:
    """Everything a volume's state depends on, at one instant, as plain values."""

    volume: str
    role: Role
    source: str = ""  #: a mirror's source node
    #: why the volume is not served at all (it could not be opened at start; "" if it is)
    open_failure: str = ""
    errors: tuple[str, ...] = ()  #: errors the volume reported (each makes it failed)
    fault_lines: tuple[str, ...] = ()  #: what status says about its disk faults
    disk_failed: bool = False  #: a disk fault other than a full disk, or writes wait for a restart
    no_space: bool = False  #: a write or writeback failed because the state filesystem is full
    #: the log space is full and this mirror's replay keeps its log: it stopped fetching
    log_space_stopped: bool = False
    fences: tuple[tuple[FenceHolder, str], ...] = ()  #: who refuses writes, and why
    split_brains: tuple[str, ...] = ()  #: each unresolved split brain, described
    copying: bool = False  #: a first image copy (a new replica) runs; the volume is not served yet
    copy_failed: str = ""  #: why the first image copy failed ("" if it did not)
    copy_error: str = ""  #: the copy's last fetch error, in words: it is retried ("" if none)
    #: a served mirror's fetch and replay (None: not known, the node's view alone; such a mirror
    #: is not sure it is not behind)
    fetch: MirrorFacts | None = None
    meta_error: str = ""  #: what following the designated primary cannot do ("" if nothing)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A volume's state, the error lines that explain it, and what the operator runs next."""

    state: VolumeState
    errors: tuple[str, ...] = ()
    next: str = ""  #: the operator's next command, as text ("" when there is nothing to do)
    conditions: tuple[VolumeState, ...] = ()  #: every state whose condition holds, by precedence
    refusal: str = ""  #: the source's refusal code that stopped a mirror's fetch ("" if none)


def volume_state(f: VolumeFacts) -> Verdict:
    """The state of a volume from its facts (see the module's precedence order)."""
    v = f.volume
    m = f.fetch
    errors = [f.open_failure] if f.open_failure else []
    errors += [*f.errors, *f.fault_lines]
    if f.log_space_stopped:
        errors.append(f"log space is full: {v} stopped fetching, because its replay keeps its log; it fetches "
                      f"again once replay lets log go (marsfs resume-replay {v}) or --log-space is raised")
    if f.role == Role.PRIMARY:
        errors += [why for _, why in f.fences]
    errors += f.split_brains
    if f.copy_failed:
        errors.append(f"copy from {f.source} failed: {f.copy_failed}; retry with: marsfs join {v} --from "
                      f"{f.source}, or give up with: marsfs leave {v}")
    elif f.copy_error:
        errors.append(f"copy from {f.source}: {f.copy_error} (retrying; the copy resumes where it was)")
    mirror = f.role == Role.MIRROR and not f.copying and not f.copy_failed and not f.open_failure
    if mirror and m is not None and m.error:
        errors.append(f"fetch from {m.source}: {m.error}")
    refused = refusal_state(m.fatal) if mirror and m is not None and m.fetching and m.fatal else None
    no_fetch = mirror and m is not None and not m.fetching
    if no_fetch and m is not None and not m.error:
        errors.append(f"no fetch runs for this mirror of {m.source}; restart the daemon")

    held: list[tuple[VolumeState, str]] = []  #: (state, next command) of every condition that holds
    if f.open_failure or f.errors or f.disk_failed or f.copy_failed or no_fetch or refused == VolumeState.FAILED:
        held.append((VolumeState.FAILED, f"marsfs join {v} --from {f.source}" if f.copy_failed
                     else f"marsfs invalidate {v}" if f.open_failure and f.role == Role.MIRROR
                     else "restart the daemon (marsfs serve) once the cause is fixed"))
    if f.no_space:
        held.append((VolumeState.NO_SPACE, "free space on the state directory's filesystem"))
    elif f.log_space_stopped:
        held.append((VolumeState.NO_SPACE, f"marsfs resume-replay {v}"))
    if f.split_brains or refused == VolumeState.SPLIT_BRAIN:
        held.append((VolumeState.SPLIT_BRAIN, f"marsfs invalidate {v}"))
    if refused == VolumeState.NEEDS_RESYNC:
        held.append((VolumeState.NEEDS_RESYNC, f"marsfs invalidate {v}"))
    if f.copying and not f.copy_failed:
        held.append((VolumeState.SYNCING, f"marsfs wait {v} --synced"))
    if mirror and m is not None and m.resyncing:
        held.append((VolumeState.RESYNCING, f"marsfs wait {v} --synced"))
    if f.role == Role.PRIMARY and f.fences:
        held.append((VolumeState.FENCED, ""))
    stalled = ""
    if mirror and m is not None:  # the pause flags are the operator's, fetch or not
        if m.fetch_paused:
            held.append((VolumeState.FETCH_PAUSED, f"marsfs resume-fetch {v}"))
        if m.replay_paused:
            held.append((VolumeState.REPLAY_PAUSED, f"marsfs resume-replay {v}"))
    if mirror and m is not None and m.fetching:
        if not m.connected:
            if m.since_progress > STALL_AFTER:
                stalled = f"stalled: no connection to {m.source} for {m.since_progress:.0f} s"
                held.append((VolumeState.STALLED, ""))
            else:
                held.append((VolumeState.DISCONNECTED, ""))
        elif m.missing_records and m.since_progress > STALL_AFTER:
            stalled = (f"stalled: no records from {m.source} for {m.since_progress:.0f} s while "
                       f"{m.missing_records} are missing")
            held.append((VolumeState.STALLED, ""))
    if mirror and (m is None or m.lag_records or m.heartbeat_age is None or m.heartbeat_age > FRESH):
        held.append((VolumeState.CATCHING_UP, f"marsfs wait {v} --synced"))  # behind, or not sure it is not
    if not held:
        held.append((VolumeState.SYNCED if f.role == Role.MIRROR else VolumeState.UP, ""))
    state, todo = held[0]
    if state == VolumeState.STALLED:
        errors.append(stalled)
    if m is not None and m.sync_waiting and mirror:
        errors.append(f"resync done, switch waits: {m.sync_waiting}")
    if f.meta_error:
        errors.append(f.meta_error)
    return Verdict(state=state, errors=tuple(errors), next=todo, conditions=tuple(s for s, _ in held),
                   refusal=m.fatal if refused is not None and m is not None else "")


#: Why a copy in each state must not become primary, by precedence (what a handover or a
#: failover onto it would lose), and what the operator runs instead; ``{v}`` is the volume,
#: ``{node}`` this node, ``{source}`` its source. A split brain is refused before these, naming
#: the peer (marsfs.node.handover).
NOT_PROMOTABLE: dict[VolumeState, tuple[str, str]] = {
    VolumeState.FAILED: ("its copy failed and cannot be trusted as the volume's history",
                         "{next}, or make another mirror primary"),
    VolumeState.NEEDS_RESYNC: ("its copy needs a resync: {source} refused its fetch ({refusal})",
                               "resync it (marsfs invalidate {v}, then marsfs wait {v} --synced), or make "
                               "another mirror primary"),
    VolumeState.SYNCING: ("its first copy from {source} is not complete",
                          "wait for it (marsfs wait {v} --synced), or make another mirror primary"),
    VolumeState.RESYNCING: ("its copy is being resynced from {source} and is not whole until the resync "
                            "switches; becoming primary now would drop the resync and keep the copy it replaces",
                            "wait for it (marsfs wait {v} --synced), then run marsfs primary {v} again, or make "
                            "another mirror primary"),
}


def promotion_refusal(verdict: Verdict, volume: str, node: str, source: str) -> tuple[VolumeState, str] | None:
    """Why the copy of ``volume`` on ``node`` (a mirror of ``source``) must not become primary:
    the state, and one line with what to run instead; None when none of :data:`NOT_PROMOTABLE`'s
    states holds.
    The first such condition by precedence names the reason, the verdict's first error line
    (if any) says what happened."""
    for state in verdict.conditions:
        if state in NOT_PROMOTABLE:
            why, todo = NOT_PROMOTABLE[state]
            fill = {"v": volume, "source": source or "its source", "refusal": verdict.refusal or "refused",
                    "next": verdict.next or "see marsfs status " + volume}
            seen = f" ({verdict.errors[0]})" if verdict.errors and state == VolumeState.FAILED else ""
            waits = [e for e in verdict.errors if e.startswith("resync done, switch waits:")]
            seen += f" ({waits[0]})" if waits and state == VolumeState.RESYNCING else ""
            return state, (f"volume {volume!r} on node {node} is {state.value}: {why.format(**fill)}{seen}; "
                           f"{todo.format(**fill)}")
    return None


def mirror_state(f: MirrorFacts, volume: str = "") -> tuple[VolumeState, list[str]]:
    """The state of a served mirror from its fetch facts alone, and the error lines that
    explain it: :func:`volume_state` of a mirror with nothing else wrong."""
    verdict = volume_state(VolumeFacts(volume=volume, role=Role.MIRROR, fetch=f))
    return verdict.state, list(verdict.errors)


def peer_state(*, connected: bool, fetch_paused: bool, replay_paused: bool, lag_records: int,
               syncing: bool = False) -> VolumeState:
    """A mirror's state as its source sees it (from the mirror's ACKs and our log), in the
    same order as :func:`volume_state` as far as a source can tell."""
    if syncing:
        return VolumeState.SYNCING
    if fetch_paused:
        return VolumeState.FETCH_PAUSED
    if replay_paused:
        return VolumeState.REPLAY_PAUSED
    if not connected:
        return VolumeState.DISCONNECTED
    return VolumeState.CATCHING_UP if lag_records else VolumeState.SYNCED
