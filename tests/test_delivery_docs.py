"""docs/policy.md lists every listener, upstream and queue key (the docs keep up with the code)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.policy import Listener, Queue, Upstream

POLICY_DOC = (Path(__file__).parent.parent / "docs" / "policy.md").read_text()


@pytest.mark.parametrize(
    ("prefix", "model", "skip"),
    [
        ("listen[].", Listener, {"address"}),
        ("upstream.", Upstream, {"url"}),
        ("queue.", Queue, set()),
    ],
)
def test_every_key_is_in_the_policy_reference(prefix, model, skip):
    missing = [
        name
        for name in model.model_fields
        if name not in skip and f"`{prefix}{name}`" not in POLICY_DOC
    ]
    assert missing == []
