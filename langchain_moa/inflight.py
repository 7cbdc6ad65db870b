"""Requests to the embedded llama.cpp servers now in flight.

`ChatLocal` (`constrained`) counts each of its calls; `LocalServer.stop` (`local`) waits for
the count to reach zero before destroying a server. Both import this module; neither
imports the other for it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Requests to the embedded servers now in flight (see `LocalServer.stop`).
_in_flight = 0
_in_flight_changed = threading.Condition()


@contextmanager
def request_in_flight() -> Iterator[None]:
    """Count one request to an embedded server while it runs (`ChatLocal` wraps its calls)."""
    global _in_flight
    with _in_flight_changed:
        _in_flight += 1
    try:
        yield
    finally:
        with _in_flight_changed:
            _in_flight -= 1
            _in_flight_changed.notify_all()


def wait_until_idle(timeout: float) -> bool:
    """Wait up to `timeout` seconds for no request to be in flight; True when none is."""
    with _in_flight_changed:
        return _in_flight_changed.wait_for(lambda: _in_flight == 0, timeout)
