"""A producer thread handing items to one reader, in order, a bounded amount ahead (torch-free).

Used by `assign` twice: the cache build runs ahead of the model in decoded rows (bounded in bytes,
started before torch is imported), and the next batches are read from the memmap and copied to the
device ahead of the forward (bounded in batches).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator


class _Stopped(Exception):
    """Raised by put() in a producer whose reader has gone, so the producer unwinds."""


class Handoff:
    """Run produce(put) in a thread from now on; iterate for what it puts, in order.

    At most `limit` units wait for the reader (`weigh(item)` units each, 1 by default; one item is let
    through however much it weighs); past that, put() waits. Iteration ends when produce returns, and
    then raises produce's error, if any. `close()` (also when iteration ends or is abandoned: an error,
    Ctrl-C) makes the producer's next put() raise, so it unwinds (a cache build deletes its temporary
    file), and waits for the thread. `done` is set once produce has ended.
    """

    def __init__(self, produce: Callable[[Callable[[object], None]], None], limit: int, *,
                 weigh: Callable[[object], int] = lambda item: 1, name: str = "imgcluster-handoff"):
        self.limit, self.weigh = limit, weigh
        self.done = threading.Event()
        self._lock = threading.Condition()
        self._items: deque = deque()            # (item, weight)
        self._held = 0                          # total weight of _items
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def _run(self, produce) -> None:
        try:
            produce(self._put)
        except _Stopped:
            pass
        except BaseException as e:              # handed to the reader
            self._error = e
        finally:
            with self._lock:
                self.done.set()
                self._lock.notify_all()

    def _put(self, item) -> None:
        weight = self.weigh(item)
        with self._lock:
            while self._held and self._held + weight > self.limit and not self._closed:
                self._lock.wait()
            if self._closed:
                raise _Stopped
            self._items.append((item, weight))
            self._held += weight
            self._lock.notify_all()

    def __iter__(self) -> Iterator:
        try:
            while True:
                with self._lock:
                    while not self._items and not self.done.is_set():
                        self._lock.wait()
                    if not self._items:
                        if self._error is not None:
                            raise self._error
                        return
                    item, weight = self._items.popleft()
                    self._held -= weight
                    self._lock.notify_all()
                yield item
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._items.clear()
            self._lock.notify_all()
        self._thread.join()
