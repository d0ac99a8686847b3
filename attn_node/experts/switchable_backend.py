"""The attention node's expert backend under the control plane: a slot the current placement's backend fills.

The engine holds this object for life; a new placement version installs a new
:class:`RemoteExpertBackend`. It is the one backend whose step hooks do work
(the others derive from ``StaticExpertBackend``). Installs take effect between
steps: the engine brackets each step's model run with ``begin_step``/``end_step``, and a backend
installed during a step waits for its end, so one step never mixes versions and
the old backend can be closed as soon as it is replaced.

After a step failed because experts were unreachable, the engine calls
``wait_for_change`` (bounded) and re-runs the step on the backend installed meanwhile. Waiting is only worth
it while a placement that hosts the missing experts can come: ``outlook`` (the placement follower's verdict,
``moemesh.control.servability``) says when none can, and ``wait_for_change`` then raises
:class:`ExpertsUnservable` at once instead of waiting out the engine's ``expert_wait_s``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from moemesh.control.servability import Servability
from moemesh.expert_backend import ExpertBackend

from .replica_routes import ExpertsUnavailable, ExpertsUnservable

# The current backend -> whether its placement can serve over the live expert nodes (None: unknown, wait).
Outlook = Callable[[ExpertBackend | None], Servability | None]


class SwitchableBackend(ExpertBackend):
    def __init__(self, outlook: Outlook | None = None):
        self.outlook = outlook  # set once the placement follower exists; None: always wait
        self._current: ExpertBackend | None = None
        self._pending: ExpertBackend | None = None
        self._in_step = False
        self._generation = 0  # bumped by every backend that takes effect
        self._changed = threading.Condition()

    @property
    def current(self) -> ExpertBackend | None:
        return self._current

    @property
    def generation(self) -> int:
        return self._generation

    def install(self, backend: ExpertBackend, timeout_s: float | None = None) -> bool:
        """Make ``backend`` current at the next step boundary; block until it is (True) or ``timeout_s`` passes."""
        with self._changed:
            replaced, self._pending = self._pending, backend
            if not self._in_step:
                self._promote()
            took = self._changed.wait_for(lambda: self._current is backend or self._pending is not backend,
                                          timeout_s)
        if replaced is not None:
            replaced.close()  # installed over before it ever served
        return took and self._current is backend

    def _promote(self) -> None:
        """Under the lock, outside a step: the pending backend becomes current; the old one is closed."""
        if self._pending is None:
            return
        old, self._current, self._pending = self._current, self._pending, None
        self._generation += 1
        self._changed.notify_all()
        if old is not None:  # no step can hold a handle of it (installs happen between steps); closing may
            # wait for links' threads, so not on the engine's thread
            threading.Thread(target=old.close, name="close-old-backend", daemon=True).start()

    def begin_step(self) -> int:
        with self._changed:
            self._promote()
            self._in_step = True
            return self._generation

    def end_step(self) -> None:
        with self._changed:
            self._in_step = False
            self._promote()

    def wait_for_change(self, generation: int, timeout_s: float) -> bool:
        """Block (not in a step) until a backend newer than ``generation`` is current; False on timeout.

        Raises ExpertsUnservable at once, without waiting, when no newer backend is in hand and ``outlook`` says
        no placement over the live expert nodes can host the missing experts."""
        with self._changed:
            fresh, current = self._generation != generation or self._pending is not None, self._current
        verdict = None if fresh or self.outlook is None else self.outlook(current)
        if verdict is not None and verdict.state == "unservable":
            raise ExpertsUnservable(verdict.message)
        with self._changed:
            changed = self._changed.wait_for(
                lambda: self._generation != generation or self._pending is not None, timeout_s)
            self._promote()
            return changed

    def dispatch(self, layer_id, x, topk_idx, topk_weights):
        backend = self._current
        if backend is None:
            raise ExpertsUnavailable("no expert placement is serving yet: waiting for expert nodes to be ready")
        return backend, backend.dispatch(layer_id, x, topk_idx, topk_weights)

    def combine(self, handle):
        backend, inner = handle
        return backend.combine(inner)

    def close(self) -> None:
        with self._changed:
            backends = [b for b in (self._current, self._pending) if b is not None]
            self._current = self._pending = None
            self._changed.notify_all()
        for backend in backends:
            backend.close()
