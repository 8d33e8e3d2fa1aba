"""docs/policy.md lists every policy key: each section's fields and every plain top-level key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from mailgate.policy import (
    Dns,
    Limits,
    Listener,
    Logging,
    Policy,
    Protocol,
    Quarantine,
    Queue,
    Scoring,
    State,
    Upstream,
)

POLICY_DOC = (Path(__file__).parent.parent / "docs" / "policy.md").read_text()

# Section -> its model and the fields documented as the section's own row (a shorthand).
SECTIONS: dict[str, tuple[type[BaseModel], set[str]]] = {
    "listen": (Listener, {"address"}),
    "upstream": (Upstream, {"url"}),
    "queue": (Queue, set()),
    "quarantine": (Quarantine, set()),
    "limits": (Limits, set()),
    "protocol": (Protocol, set()),
    "scoring": (Scoring, set()),
    "log": (Logging, set()),
    "dns": (Dns, set()),
    "state": (State, {"url"}),
}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_of_a_section_is_in_the_policy_reference(section):
    model, shorthand = SECTIONS[section]
    prefix = f"{section}[]." if section == "listen" else f"{section}."
    missing = [
        name
        for name in model.model_fields
        if name not in shorthand and f"`{prefix}{name}`" not in POLICY_DOC
    ]
    assert missing == []


def test_every_top_level_key_is_in_the_policy_reference():
    assert set(SECTIONS) <= set(Policy.model_fields)
    plain = [name for name in Policy.model_fields if name not in SECTIONS or SECTIONS[name][1]]
    assert [name for name in plain if f"| `{name}` |" not in POLICY_DOC] == []
