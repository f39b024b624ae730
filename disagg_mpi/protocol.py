"""Everything that crosses a rank boundary: the MPI tags, one frozen record per message, one codec.

Who sends what, on which tag (all on the control communicator but the last group):

| tag | from -> to | records |
| --- | --- | --- |
| TO_EXECUTOR | rank 0 -> an executor's leader | Enqueue, Cancel, StatsRequest, Shutdown |
| TO_ORCHESTRATOR | a leader -> rank 0 | Ready, Responses, ExecutorStats |
| PEER | a generation leader <-> a context leader | Claim, ClaimReply, Release, ContextReady |
| MEMBER | a leader -> the other ranks of its executor | Step, Pull, StopMember |
| MEMBER_DONE | a member -> its leader | Pulled |
| KV_PULL (KV communicator) | a generation rank -> a context rank | PullAsk |
| a pull's own tag (KV) | context rank <-> generation rank | PullAnswer, PullDone (then chunks) |

On the wire a record is msgpack of `[kind, field, field, ...]`: a small integer names the record,
fields go by position (no key strings, so a record is smaller than the dicts it replaced).
`decode` refuses a kind it does not know, a record of the wrong length or with a field of the
wrong type, and a record that arrived on a tag it does not belong to, with a `ProtocolError`
that names the message, never a `KeyError` deep in a loop. Receivers dispatch with `match`.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack

from .api import Request, Response

if TYPE_CHECKING:
    from .engine.model_runner import StepPlan


class Tag(enum.IntEnum):
    """Tags on the control communicator (a dup of the world, so they never meet KV data)."""

    TO_EXECUTOR = 1
    TO_ORCHESTRATOR = 2
    PEER = 3
    MEMBER = 4
    MEMBER_DONE = 5


# On the KV communicator: a pull asks on KV_PULL; its answer and its chunks travel on a tag of
# its own, from KV_FIRST_DATA_TAG up to the MPI library's TAG_UB (transfer/transceiver.py).
KV_PULL = 1
KV_FIRST_DATA_TAG = 100


class ProtocolError(RuntimeError):
    """A message that is not one this protocol defines, or not where it arrived."""


_KINDS: dict[int, type[Message]] = {}


_BY_NAME = {"int": (int,), "float": (float, int), "str": (str,), "bytes": (bytes,), "bool": (bool,),
            "list": (list,), "dict": (dict,), "None": (type(None),)}


def _field_checks(cls: type) -> tuple[tuple[str, tuple[type, ...] | None], ...]:
    """(name, allowed types) per field, from the annotations (strings: `int`, `str | None`,
    `list`...); None for a field of another type, which its record's `_from_wire` converts."""
    out = []
    for f in fields(cls):
        allowed: list[type] | None = []
        for part in str(f.type).split("|"):
            types_ = _BY_NAME.get(part.strip().split("[")[0])
            if types_ is None:
                allowed = None
                break
            allowed.extend(types_)
        out.append((f.name, tuple(allowed) if allowed is not None else None))
    return tuple(out)


class Message:
    """Base of every record; `_record` makes each subclass a frozen dataclass with its KIND
    (unique) and TAG (where it travels). Fields go on the wire by position; a record with
    nested objects converts them in its own `_wire` / `_from_wire`."""

    KIND: ClassVar[int] = 0
    TAG: ClassVar[int | None] = None
    _checks: ClassVar[tuple] = ()  # (name, allowed types | None) per field
    _required: ClassVar[int] = 0  # fields without a default
    _fields: ClassVar[Callable[[Any], tuple]] = staticmethod(lambda _m: ())  # the field values, in order

    def _wire(self) -> list:
        return [*self._fields(self)]

    @classmethod
    def _from_wire(cls, values: list) -> Message:
        for (name, allowed), v in zip(cls._checks, values):
            if allowed is not None and not isinstance(v, allowed):
                raise ProtocolError(f"{cls.__name__}.{name} is a {type(v).__name__}, not "
                                    + " | ".join(t.__name__ for t in allowed))
        return cls(*values)


def _record(kind: int, tag: int | None):
    """Class decorator: a frozen dataclass registered under `kind`, travelling on `tag`."""
    def wrap(cls: type) -> type:
        if kind in _KINDS:
            raise TypeError(f"message kind {kind} of {cls.__name__} is taken by {_KINDS[kind].__name__}")
        cls = dataclass(frozen=True)(cls)
        cls.KIND, cls.TAG = kind, tag
        cls._checks = _field_checks(cls)
        cls._required = sum(1 for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING)
        names = [f.name for f in fields(cls)]
        if len(names) > 1:
            cls._fields = staticmethod(operator.attrgetter(*names))
        elif names:
            get = operator.attrgetter(names[0])
            cls._fields = staticmethod(lambda m: (get(m),))
        _KINDS[kind] = cls
        return cls
    return wrap


# ---- rank 0 -> an executor's leader ---------------------------------------------------------


@_record(1, Tag.TO_EXECUTOR)
class Enqueue(Message):
    """Requests for this executor, each under the executor-local id rank 0 gave it. `client_holds`:
    context-only requests whose generation phase a client sends itself (HTTP context_only), so
    their held blocks count against `max_held_fraction` (engine/hold_cap.py).

    The direct hand-off (`direct_handoff`; engine/direct.py), one request per Enqueue: `notify` on a
    context-only request is [generation leader's world rank, its request id there], to which the
    context leader sends `ContextReady` once the context is held; `await_context` marks a
    generation-only request sent without params, parked until that `ContextReady` comes."""

    items: list  # [(exec_req_id, Request)]
    client_holds: bool = False
    notify: list | None = None
    await_context: bool = False

    def _wire(self) -> list:
        return [[[rid, r.to_dict()] for rid, r in self.items], self.client_holds, self.notify, self.await_context]

    @classmethod
    def _from_wire(cls, values: list) -> Enqueue:
        items, *rest = values
        holds, notify, awaits = (*rest, *(False, None, False)[len(rest):])  # (older senders send fewer)
        for name, v, ok in (("client_holds", holds, isinstance(holds, bool)),
                            ("await_context", awaits, isinstance(awaits, bool)),
                            ("notify", notify, notify is None or (isinstance(notify, list) and len(notify) == 2
                                                                  and all(type(x) is int for x in notify)))):
            if not ok:
                raise ProtocolError(f"Enqueue.{name}={v!r:.60} is not allowed; "
                                    + ("a [rank, request id] pair of ints or None" if name == "notify" else "a bool"))
        return cls([(int(rid), Request.from_dict(d)) for rid, d in items], holds, notify, awaits)


@_record(2, Tag.TO_EXECUTOR)
class Cancel(Message):
    req_id: int


@_record(3, Tag.TO_EXECUTOR)
class StatsRequest(Message):
    """Asks the leader for its counters (answered with ExecutorStats)."""


@_record(4, Tag.TO_EXECUTOR)
class Shutdown(Message):
    """The job is ending: the leader stops its members and leaves its loop."""


# ---- a leader -> rank 0 ---------------------------------------------------------------------


@_record(10, Tag.TO_ORCHESTRATOR)
class Ready(Message):
    """The executor built its model (error None) or failed to (error says why)."""

    executor: int
    error: str | None
    device: str | None = None


@_record(11, Tag.TO_ORCHESTRATOR)
class Responses(Message):
    """Responses under executor-local ids, with the executor's load after them."""

    executor: int
    responses: list  # [Response]
    load: int
    free_blocks: int

    def _wire(self) -> list:
        return [self.executor, [r.to_dict() for r in self.responses], self.load, self.free_blocks]

    @classmethod
    def _from_wire(cls, values: list) -> Responses:
        ex, rs, load, free = values
        return cls(int(ex), [Response.from_dict(d) for d in rs], int(load), int(free))


@_record(12, Tag.TO_ORCHESTRATOR)
class ExecutorStats(Message):
    executor: int
    counters: dict  # LLMEngine.snapshot(): blocks, queues, iterations


# ---- leader <-> leader (the hand-off) -------------------------------------------------------


@_record(20, Tag.PEER)
class Claim(Message):
    """A generation leader asks a context leader for a held context's blocks."""

    ctx_req_id: int
    gen_req_id: int
    blocks: list
    executor: int


@_record(21, Tag.PEER)
class ClaimReply(Message):
    """None error: granted. `answered_at`/`node`: the context leader's wall clock and node."""

    gen_req_id: int
    error: str | None
    answered_at: float
    node: str


@_record(22, Tag.PEER)
class Release(Message):
    """The generation side has the KV (or will not pull it): the context may free the blocks."""

    ctx_req_id: int
    gen_req_id: int | None


@_record(23, Tag.PEER)
class ContextReady(Message):
    """The direct hand-off: a context leader tells the generation leader rank 0 named (`Enqueue.notify`)
    that the context is held, with its signed params; the claim is granted with it (no Claim)."""

    gen_req_id: int
    ctx_req_id: int
    first_gen_tokens: list
    opaque_state: bytes


# ---- a leader -> its members, and back ------------------------------------------------------


@_record(30, Tag.MEMBER)
class Step(Message):
    plan: StepPlan

    def _wire(self) -> list:
        return [self.plan.to_dict()]

    @classmethod
    def _from_wire(cls, values: list) -> Step:
        from .engine.model_runner import StepPlan  # (the transfer layer imports this module too)

        (plan,) = values
        return cls(StepPlan.from_dict(plan))


@_record(31, Tag.MEMBER)
class Pull(Message):
    """Every rank of the generation executor pulls its share of a request's KV."""

    req_id: int
    opaque: bytes  # the signed OpaqueState
    blocks: list


@_record(32, Tag.MEMBER)
class StopMember(Message):
    """The leader is leaving its loop: so do its members."""


@_record(33, Tag.MEMBER_DONE)
class Pulled(Message):
    req_id: int
    nbytes: int


# ---- the KV pull (KV communicator) ----------------------------------------------------------


@_record(40, KV_PULL)
class PullAsk(Message):
    """What a generation rank wants from one context rank (transfer/recv_side.py)."""

    tag: int  # the pull's own tag: the answer and the chunks come on it
    blocks: list  # the context rank's block ids
    layers: list  # [start, end) global layers
    heads: list  # [start, end) global KV heads
    zero_copy: bool
    per_chunk: int
    cache_state: dict
    bounds: list | None = None
    ipc_node: str | None = None  # asks to map the context pool (CUDA IPC) from this node
    ring: dict | None = None  # offers a shared staging ring: Ring.describe() + node + seq


class PullPath(str, enum.Enum):
    IPC = "ipc"  # the generation rank copies from the mapped context pool
    RING = "ring"  # the context rank copies into the shared ring
    COPY = "copy"  # chunks over MPI


@_record(41, None)
class PullAnswer(Message):
    """The context rank's answer to a PullAsk that asked for CUDA IPC or offered a ring."""

    path: str  # a PullPath value
    why: str | None = None  # COPY: why the asked path was refused
    ipc: dict | None = None  # IPC: the exported pool (CudaIpcExporter.info())


@_record(42, None)
class PullDone(Message):
    """IPC: the generation rank has copied; the context rank may count the pull served."""


# ---- the codec -------------------------------------------------------------------------------


_pack = msgpack.Packer().pack  # one packer, reused (a new one per message costs a microsecond)


def encode(msg: Message) -> bytes:
    return _pack([msg.KIND, *msg._wire()])


def decode(payload: bytes, tag: int | None = None) -> Message:
    """The record in `payload`; with `tag`, also check that it belongs there."""
    try:
        values = msgpack.unpackb(payload, strict_map_key=False)
    except Exception as err:  # noqa: BLE001 - whatever msgpack raises, the message is not ours
        raise ProtocolError(f"a message on tag {tag} is not msgpack: {err}") from None
    if not isinstance(values, list) or not values or not isinstance(values[0], int):
        raise ProtocolError(f"a message on tag {tag} is not a [kind, fields...] record: {values!r:.200}")
    cls = _KINDS.get(values[0])
    if cls is None:
        raise ProtocolError(f"unknown message kind {values[0]} on tag {tag}")
    if tag is not None and cls.TAG is not None and cls.TAG != tag:
        raise ProtocolError(f"{cls.__name__} arrived on tag {tag}; it belongs on tag {cls.TAG}")
    args = values[1:]
    if not len(cls._checks) >= len(args) >= cls._required:
        raise ProtocolError(f"{cls.__name__} has {len(args)} fields; it takes {len(cls._checks)}")
    try:
        return cls._from_wire(args)
    except ProtocolError:
        raise
    except Exception as err:  # noqa: BLE001 - a nested record's own conversion failed: name the message
        raise ProtocolError(f"malformed {cls.__name__}: {type(err).__name__}: {err}") from None


def message_kinds() -> dict[int, type[Message]]:
    """Every record, by kind (for tests and docs)."""
    return dict(_KINDS)
