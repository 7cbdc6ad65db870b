"""The scripted test server's own behaviour (langchain_moa.testing.server), in process.

Its heavy-tailed latency is what the early-layer-close benchmarks measure against, so it
must be a property of the request, not of the run.
"""

from __future__ import annotations

from langchain_moa.testing.server import request_latency


def test_heavy_tail_latency_is_fixed_by_the_request() -> None:
    body = {"messages": [{"role": "user", "content": "q1"}]}
    first = request_latency("p1", body, (0.2, 0.8))
    assert first == request_latency("p1", dict(body), (0.2, 0.8))  # same request, same wait
    draws = [
        request_latency("p1", {"messages": [{"role": "user", "content": f"q{i}"}]}, (0.2, 0.8))
        for i in range(400)
    ]
    assert 0.15 < sorted(draws)[200] < 0.27  # median near 0.2 s
    assert sorted(draws)[380] > 3 * sorted(draws)[200]  # p95 several times the median
    assert request_latency("p1", body, None) == 0.0
