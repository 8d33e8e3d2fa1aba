"""The test suite's harness is the one mailgate ships for plugin authors: mailgate.testing."""

from mailgate.testing import (
    MESSAGE,
    Harness,
    LoopThread,
    Received,
    RecordingUpstream,
    RunningGateway,
    UpstreamBehaviour,
    gateway_harness,
    write_policy,
)

__all__ = [
    "MESSAGE",
    "Harness",
    "LoopThread",
    "Received",
    "RecordingUpstream",
    "RunningGateway",
    "UpstreamBehaviour",
    "gateway_harness",
    "write_policy",
]
