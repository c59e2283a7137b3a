"""One multi-rank save, coordinated over the group's store. Blocking and asyncio-free: the
workers run it in their write thread, the trainers (after a worker crash) in ``to_thread``.

Theory of operation
-------------------
The ranks of a save meet at keys of the store under ``save/<round_id>/``. Each key has one
owner, the rank whose worker posts it:

=============  ======  ===============================================================
``prepared``   rank 0  the shared temporary directory every rank writes into
``plan/<r>``   rank r  rank r's local plan (writers that plan globally: DCP)
``assign``     rank 0  what each rank writes (DCP: replicated items written once)
``part/<r>``   rank r  what rank r wrote: files, leaves, writer data
``outcome``    rank 0  the committed checkpoint
=============  ======  ===============================================================

Every value is posted with ``compare_set`` against "absent", so the first value posted to a
key wins and is what every reader sees. Besides its owner's success, three other values can
be posted to a key: the owner's own failure (its writer raised), a failure posted by the
owner's *trainer* when the owner's worker died (the trainer posts to every key its worker
owed), and a timeout posted by a reader that gave up waiting for the owner. Whoever reads a
failure raises it; so when any rank fails, rank 0 fails the outcome and commits nothing, and
every rank's save fails naming the rank at fault.

First-value-wins is also what keeps a late rank from wedging the group: a rank that arrives
after the others gave up on it finds their timeout already posted in its own key and fails at
once, rather than waiting in a save everyone else abandoned; the next save then starts with
every rank present. Nothing here is pickled: values are msgpack.
"""

from __future__ import annotations

import contextlib
import datetime
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from aiockpt._wire.protocol import GroupInfo
from aiockpt.errors import CoordinationError, CoordinationTimeout, RankFailed, qualified_name

__all__ = [
    "Failure",
    "SaveRound",
    "connect_store",
    "keys_owned_by",
    "translate_store_errors",
]


class Success(msgspec.Struct, frozen=True, tag="ok"):
    """What a key's owner posted when it delivered."""

    value: Any = None


class Failure(msgspec.Struct, frozen=True, tag="failed"):
    """Why a key's owner did not deliver: ``rank`` is the rank at fault."""

    rank: int
    error_type: str
    message: str
    traceback: str | None = None
    #: posted by a rank that gave up waiting, rather than by the owner's side
    timed_out: bool = False

    def to_exception(self) -> CoordinationTimeout | RankFailed:
        """The error a rank that reads this failure raises. It keeps the failure, so that
        passing it on (rank 0 failing the outcome) still names the rank at fault."""
        exc: CoordinationTimeout | RankFailed
        if self.timed_out:
            exc = CoordinationTimeout(self.message, rank=self.rank)
        else:
            exc = RankFailed(
                f"rank {self.rank} failed: {self.error_type}: {self.message}",
                rank=self.rank,
                error_type=self.error_type,
                traceback=self.traceback,
            )
        exc.failure = self  # type: ignore[union-attr]
        return exc


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Success | Failure)


@contextlib.contextmanager
def translate_store_errors(what: str) -> Iterator[None]:
    """Raise torch's store errors inside as aiockpt's, naming ``what`` was being done:
    ``CoordinationTimeout`` for a store that did not answer in time (``DistStoreError``),
    ``CoordinationError`` for one that cannot be reached or failed otherwise (another
    ``DistError``, or the ``RuntimeError`` the bindings raise); the cause is chained."""
    try:
        yield
    except dist.DistStoreError as exc:
        raise CoordinationTimeout(f"{what}: the group's store did not answer: {exc}") from exc
    except (dist.DistError, RuntimeError) as exc:
        raise CoordinationError(f"{what}: the group's store failed: {exc}") from exc


def keys_owned_by(rank: int) -> list[str]:
    """The keys of one save that ``rank`` must post, in the order it posts them."""
    owned = [f"plan/{rank}", f"part/{rank}"]
    return ["prepared", owned[0], "assign", owned[1], "outcome"] if rank == 0 else owned


def connect_store(group: GroupInfo, *, base: Store | None = None) -> Store:
    """The group's key space: a client of the store at ``group.addr:group.port`` (or
    ``base``), prefixed by the group's prefix and session.

    Raises ``CoordinationError`` (``CoordinationTimeout``) when the store cannot be reached
    within ``group.timeout_s``.
    """
    if base is None:
        with translate_store_errors(f"connecting to {group.addr}:{group.port}"):
            base = TCPStore(
                group.addr,
                group.port,
                is_master=False,
                timeout=datetime.timedelta(seconds=group.timeout_s),
            )
    return PrefixStore(f"{group.prefix}{group.session}", base)  # it adds the "/" itself


class SaveRound:
    """The keys of save ``round_id``, seen from ``rank``."""

    def __init__(
        self, store: Store, round_id: str, *, rank: int, world_size: int, timeout_s: float
    ) -> None:
        self.store = store
        self.round_id = round_id
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s

    def _key(self, name: str) -> str:
        return f"save/{self.round_id}/{name}"

    def post(self, name: str, value: Any) -> None:
        """Post this rank's ``value`` to ``name``; raise what another rank posted there first
        (a timeout: the others gave up on this rank). Raises ``CoordinationError`` when the
        store fails."""
        with translate_store_errors(f"save {self.round_id!r}, step {name!r}"):
            won = self._post(name, Success(value))
        if isinstance(won, Failure):
            raise won.to_exception()

    def fail(self, exc: BaseException, names: Sequence[str] | None = None) -> None:
        """Post ``exc`` to ``names`` (default: every key this rank owes), except where a value
        is already posted. Never raises for a store that has gone away: the others then time
        out instead."""
        failure = getattr(exc, "failure", None)
        if not isinstance(failure, Failure):
            failure = Failure(
                exc.rank
                if isinstance(exc, CoordinationError) and exc.rank is not None
                else self.rank,
                qualified_name(type(exc)),
                str(exc),
                "".join(traceback.format_exception(exc)),
            )
        for name in keys_owned_by(self.rank) if names is None else names:
            try:
                self._post(name, failure)
            except dist.DistError:
                return

    def collect(self, names: Sequence[str], owners: Sequence[int]) -> list[Any]:
        """The values posted to ``names`` (owned by ``owners``), waiting up to the timeout.

        For a key still empty at the deadline this rank posts a timeout naming its owner, so
        that the owner, should it come, fails at once. Raises the first failure found
        (``RankFailed`` or ``CoordinationTimeout``).
        """
        keys = [self._key(name) for name in names]
        started = time.monotonic()
        try:
            self.store.wait(keys, datetime.timedelta(seconds=self.timeout_s))
        except dist.DistError:
            waited = time.monotonic() - started
            for name, owner in zip(names, owners, strict=True):
                with translate_store_errors(f"save {self.round_id!r}, step {name!r}"):
                    if not self.store.check([self._key(name)]):
                        self._post(name, self._timeout(name, owner, waited))
        delivered: list[Any] = []
        for key in keys:
            with translate_store_errors(f"save {self.round_id!r}, reading {key!r}"):
                posted = self.store.get(key)
            value = _decoder.decode(posted)
            if isinstance(value, Failure):
                raise value.to_exception()
            delivered.append(value.value)
        return delivered

    def forget(self) -> None:
        """Delete this save's keys (best effort): rank 0 does so two saves later, when no
        rank can still be reading them without having timed out."""
        names = ["prepared", "assign", "outcome"]
        names += [f"{kind}/{r}" for r in range(self.world_size) for kind in ("plan", "part")]
        for name in names:
            try:
                self.store.delete_key(self._key(name))
            except dist.DistError:
                return

    def _timeout(self, name: str, owner: int, waited: float) -> Failure:
        return Failure(
            owner,
            qualified_name(CoordinationTimeout),
            f"rank {owner} did not reach step {name!r} of save {self.round_id!r} within "
            f"{waited:.1f} s (rank {self.rank} stopped waiting; timeout_s={self.timeout_s})",
            timed_out=True,
        )

    def _post(self, name: str, value: Success | Failure) -> Success | Failure:
        # The binding takes bytes as well as str (msgpack is not text).
        encoded = _encoder.encode(value)
        current = self.store.compare_set(self._key(name), "", encoded)  # type: ignore[arg-type]
        won: Success | Failure = _decoder.decode(current)
        return won
