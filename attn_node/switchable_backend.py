"""The attention node's expert backend under the control plane: a slot the current placement's backend fills.

The engine holds this object for life; a new placement version installs a new
:class:`RemoteExpertBackend`. Each dispatch handle remembers the backend that made
it, so a swap between dispatch and combine of a layer cannot mix versions; the
old backend is closed once no step can still be using it.
"""

from __future__ import annotations

import threading

from moemesh.expert_backend import ExpertBackend

from .remote_backend import ExpertsUnavailable, RemoteExpertBackend

RETIRE_AFTER_S = 30.0  # an old backend's streams close after this (steps take far less)


class SwitchableBackend(ExpertBackend):
    def __init__(self):
        self._current: RemoteExpertBackend | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> RemoteExpertBackend | None:
        return self._current

    def install(self, backend: RemoteExpertBackend) -> None:
        with self._lock:
            old, self._current = self._current, backend
        if old is not None:
            threading.Timer(RETIRE_AFTER_S, old.close).start()

    def dispatch(self, layer_id, x, topk_idx, topk_weights):
        backend = self._current
        if backend is None:
            raise ExpertsUnavailable("no expert placement is serving yet: waiting for expert nodes to be ready")
        return backend, backend.dispatch(layer_id, x, topk_idx, topk_weights)

    def combine(self, handle):
        backend, inner = handle
        return backend.combine(inner)

    def close(self) -> None:
        with self._lock:
            backend, self._current = self._current, None
        if backend is not None:
            backend.close()
