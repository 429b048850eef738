"""One writer at a time: a lease kept in the store itself (a `lease` group's attributes).

The holder (host, pid, start time, token) refreshes a heartbeat from a background thread. A second
writer is refused with a message naming the holder; a lease whose heartbeat is older than
`stale_after` seconds (its writer died) can be taken over explicitly, and one whose holder ran on
this host in a process that no longer exists (killed) is taken over at once. Object stores offer no
atomic create here, so acquisition writes its token and reads it back: of two writers racing
within the same moment, the one whose token is not read back gives up.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any, cast

import zarr

from ..errors import StoreLockedError

STALE_AFTER_S = 300.0
HEARTBEAT_S = 30.0


def _describe(holder: dict[str, Any], now: float) -> str:
    return (f"pid {holder['pid']} on {holder['host']} since {holder['started']}"
            f" (last heartbeat {now - holder['heartbeat']:.0f} s ago)")


def _dead_here(holder: dict[str, Any]) -> bool:
    """True when the holder ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False
    return False


def stored_holder(root: zarr.Group) -> dict[str, Any] | None:
    """The lease holder as the store has it now, read afresh (not through an open node's
    attributes); None when nobody holds the lease or the store has no lease group."""
    try:
        node = zarr.open_group(root.store, path="lease", mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    holder = dict(node.attrs).get("holder")
    return cast("dict[str, Any]", holder) if holder else None  # a holder is written whole


class Lease:
    """A held writer lease; `release()` gives it back (also on normal store close)."""

    def __init__(self, node: zarr.Group, holder: dict[str, Any], interval: float) -> None:
        self.node, self.holder = node, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True,
                                        name="safe-cache-lease")
        self._thread.start()

    @classmethod
    def acquire(cls, root: zarr.Group, *, takeover: bool = False,
                stale_after: float = STALE_AFTER_S, interval: float = HEARTBEAT_S) -> Lease:
        node = root.require_group("lease")
        now = time.time()
        current = cast("dict[str, Any] | None", node.attrs.get("holder"))
        if current:
            age = now - current["heartbeat"]
            if _dead_here(current):
                age = float("inf")  # its writer was on this host and is gone: provably stale
                takeover = True
            if age < stale_after:
                raise StoreLockedError(
                    f"{root.store} is being written by {_describe(current, now)}. Wait for it to"
                    f" finish, or read it with mode='r'.")
            if not takeover:
                raise StoreLockedError(
                    f"{root.store} has a stale writer lease: {_describe(current, now)}. If that"
                    f" writer is dead, take the lease over with --takeover (takeover=True).")
        holder: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "heartbeat": now,
                  "token": uuid.uuid4().hex}
        node.attrs["holder"] = holder
        time.sleep(0.05)
        if (stored_holder(root) or {}).get("token") != holder["token"]:
            raise StoreLockedError(f"{root.store}: another writer took the lease at the same"
                                   f" moment; try again.")
        return cls(node, holder, interval)

    @staticmethod
    def check_held(root: zarr.Group, token: str) -> None:
        """Refuse a job's worker whose job no longer holds the lease (it ended, or its lease was
        taken over): its writes would land in a store someone else now owns."""
        holder = stored_holder(root)
        if not holder or holder.get("token") != token:
            held_by = _describe(holder, time.time()) if holder else "nobody"
            raise StoreLockedError(f"{root.store}: this job's writer lease is gone (the lease is"
                                   f" held by {held_by}); the worker writes nothing.")

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.holder = {**self.holder, "heartbeat": time.time()}
            self.node.attrs["holder"] = self.holder

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        current = cast("dict[str, Any] | None", self.node.attrs.get("holder"))
        if current and current.get("token") == self.holder["token"]:
            self.node.attrs["holder"] = None
