"""mailgate.state: the GCRA and greylist checks, on the memory backend and on a real Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import state as state_store
from mailgate.policy import State
from mailgate.runtime import Runtime
from mailgate.state import GreylistStatus, StateBackend, StateError
from mailgate.state.memory import SWEEP_INTERVAL, MemoryState
from mailgate.state.redis import RedisState, redact
from mailgate.yamlsource import SourceError, load
from tests.redis_support import RedisServer, free_port


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# ------------------------------------------------------------------ memory, with a fake clock


def test_gcra_allows_the_burst_then_refills_one_per_interval():
    clock = FakeClock()
    store = MemoryState(clock=clock)

    async def go() -> None:
        # 3 per 30s: interval 10s, burst 3.
        results = [await store.rate("k", 10.0, 3) for _ in range(4)]
        assert [r.allowed for r in results] == [True, True, True, False]
        assert [r.remaining for r in results[:3]] == [2, 1, 0]
        assert results[3].retry_after == pytest.approx(10.0)
        clock.now += 9.9
        assert not (await store.rate("k", 10.0, 3)).allowed
        clock.now += 0.1
        assert (await store.rate("k", 10.0, 3)).allowed
        assert not (await store.rate("k", 10.0, 3)).allowed
        # Other keys have their own bucket.
        assert (await store.rate("other", 10.0, 3)).allowed

    run(go())


def test_gcra_cost_counts_several_at_once_and_a_refusal_is_not_counted():
    clock = FakeClock()
    store = MemoryState(clock=clock)

    async def go() -> None:
        assert (await store.rate("k", 1.0, 10, cost=7)).allowed
        refused = await store.rate("k", 1.0, 10, cost=5)
        assert not refused.allowed and refused.retry_after == pytest.approx(2.0)
        assert (await store.rate("k", 1.0, 10, cost=3)).allowed

    run(go())


def test_memory_entries_expire_when_the_bucket_is_full_again():
    clock = FakeClock()
    store = MemoryState(clock=clock)

    async def go() -> None:
        for i in range(100):
            await store.rate(f"k{i}", 1.0, 5)
        assert len(store) == 100
        clock.now += SWEEP_INTERVAL + 1
        await store.rate("fresh", 1.0, 5)  # a write after the interval sweeps the table
        assert len(store) == 1

    run(go())


def test_greylist_new_early_passed_known_and_retry_window():
    clock = FakeClock()
    store = MemoryState(clock=clock)

    async def check(key: str = "t") -> GreylistStatus:
        return (await store.greylist(key, 300, 3600, 86400)).status

    async def go() -> None:
        assert await check() is GreylistStatus.NEW
        clock.now += 299
        decision = await store.greylist("t", 300, 3600, 86400)
        assert decision.status is GreylistStatus.EARLY
        assert decision.retry_after == pytest.approx(1)
        clock.now += 1
        assert await check() is GreylistStatus.PASSED
        clock.now += 80000
        assert await check() is GreylistStatus.KNOWN
        clock.now += 80000  # lifetime counts from the latest use
        assert await check() is GreylistStatus.KNOWN
        clock.now += 86401
        assert await check() is GreylistStatus.NEW
        # A retry after the retry window starts over.
        assert await check("late") is GreylistStatus.NEW
        clock.now += 3601
        assert await check("late") is GreylistStatus.NEW

    run(go())


# ------------------------------------------------------------------ both backends


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[StateBackend]:
    if request.param == "memory":
        yield MemoryState("t:")
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    yield RedisState(server.url, 2.0, "t:")


def test_rate_and_greylist_behave_alike_on_both_backends(backend: StateBackend):
    async def go() -> None:
        try:
            decisions = [await backend.rate("r", 3600.0, 2) for _ in range(3)]
            assert [d.allowed for d in decisions] == [True, True, False]
            assert 3500 < decisions[2].retry_after <= 3600  # one refills per interval
            first = await backend.greylist("g", 0.3, 60, 600)
            assert first.status is GreylistStatus.NEW and first.retry_after == pytest.approx(0.3)
            assert (await backend.greylist("g", 0.3, 60, 600)).status is GreylistStatus.EARLY
            deadline = time.monotonic() + 10
            status = GreylistStatus.EARLY
            while status is GreylistStatus.EARLY and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                status = (await backend.greylist("g", 0.3, 60, 600)).status
            assert status is GreylistStatus.PASSED
            assert (await backend.greylist("g", 0.3, 60, 600)).status is GreylistStatus.KNOWN
        finally:
            await backend.close()

    run(go())


def test_many_concurrent_checks_allow_exactly_the_burst(backend: StateBackend):
    async def go() -> list[bool]:
        try:
            results = await asyncio.gather(*(backend.rate("c", 3600.0, 10) for _ in range(60)))
            return [r.allowed for r in results]
        finally:
            await backend.close()

    assert run(go()).count(True) == 10


# ------------------------------------------------------------------ Redis specifics


@pytest.mark.redis
def test_two_clients_on_one_redis_share_one_bucket(redis_server: RedisServer):
    async def go() -> list[bool]:
        one = RedisState(redis_server.url, 2.0, "t:")
        two = RedisState(redis_server.url, 2.0, "t:")
        try:
            results = await asyncio.gather(
                *(client.rate("shared", 3600.0, 5) for _ in range(10) for client in (one, two))
            )
            return [r.allowed for r in results]
        finally:
            await one.close()
            await two.close()

    assert run(go()).count(True) == 5


@pytest.mark.redis
def test_every_redis_key_has_a_ttl(redis_server: RedisServer):
    async def go() -> None:
        store = RedisState(redis_server.url, 2.0, "t:")
        try:
            await store.rate("ttl", 60.0, 10)
            await store.greylist("ttl", 300, 3600, 86400)
            keys = sorted(k.decode() for k in await store.client.keys("t:*"))
            assert keys == ["t:gl:ttl", "t:rl:ttl"]
            assert 0 < await store.client.pttl("t:rl:ttl") <= 60_000
            assert 3_500_000 < await store.client.pttl("t:gl:ttl") <= 3_600_000
        finally:
            await store.close()

    run(go())


def test_unreachable_redis_raises_state_error_quickly():
    async def go() -> None:
        store = RedisState(f"redis://127.0.0.1:{free_port()}/0", 1.0, "t:")
        try:
            started = time.monotonic()
            with pytest.raises(StateError, match=r"redis redis://127\.0\.0\.1"):
                await store.rate("k", 1.0, 1)
            with pytest.raises(StateError):
                await store.greylist("k", 1, 2, 3)
            assert time.monotonic() - started < 30  # no retry back-off holding up mail
        finally:
            await store.close()

    run(go())


def _state_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "mailgate.state"]


@pytest.mark.redis
def test_a_hung_redis_costs_the_timeout_once_and_is_logged_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
):
    """SIGSTOP: connections are accepted by the kernel, nothing ever answers."""
    caplog.set_level(logging.INFO, logger="mailgate.state")
    assert redis_server.process is not None
    pid = redis_server.process.pid

    async def go() -> None:
        store = RedisState(redis_server.url, 1.0, "t:")
        try:
            assert (await store.rate("k", 1.0, 10)).allowed and store.up
            os.kill(pid, signal.SIGSTOP)
            try:
                for _ in range(3):
                    started = time.monotonic()
                    with pytest.raises(StateError, match=r"no answer within 1s"):
                        await store.rate("k", 1.0, 10)
                    # state.timeout bounds the whole call: no second wait on a retry.
                    assert 0.95 < time.monotonic() - started < 1.8
                    assert not store.up
            finally:
                os.kill(pid, signal.SIGCONT)
            assert (await store.rate("k", 1.0, 10)).allowed and store.up
        finally:
            await store.close()

    run(go())
    lines = _state_lines(caplog)
    assert [level for level, _ in lines] == ["WARNING", "INFO"]
    assert lines[0][1] == (
        f"state store unreachable: backend={redis_server.url} error=no answer within 1s"
    )
    assert lines[1][1].startswith(f"state store reachable again: backend={redis_server.url} down=")
    assert lines[1][1].endswith(" failed_checks=3")


@pytest.mark.redis
def test_a_redis_that_goes_down_and_comes_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="mailgate.state")

    async def go() -> None:
        store = RedisState(redis_server.url, 1.0, "t:")
        try:
            assert (await store.greylist("k", 0, 60, 60)).status is GreylistStatus.NEW
            redis_server.stop()
            for _ in range(5):
                started = time.monotonic()
                with pytest.raises(StateError, match=r"redis redis://127\.0\.0\.1"):
                    await store.rate("k", 1.0, 10)
                assert time.monotonic() - started < 0.5  # refused at once: no waiting
            assert not store.up
            redis_server.start()  # same port; the pool's old connection is stale
            assert (await store.rate("k", 1.0, 10)).allowed and store.up
        finally:
            await store.close()

    run(go())
    lines = _state_lines(caplog)
    assert [level for level, _ in lines] == ["WARNING", "INFO"]
    assert "failed_checks=5" in lines[1][1]


def test_redis_passwords_never_reach_the_logs():
    assert redact("redis://:s3cret@db:6379/0") == "redis://:***@db:6379/0"
    assert redact("redis://user:s3cret@db/1") == "redis://user:***@db/1"
    assert redact("redis://db:6379/0") == "redis://db:6379/0"


# ------------------------------------------------------------------ policy and runtime


def _doc(tmp_path: Path, text: str) -> Runtime:
    path = tmp_path / "p.yaml"
    path.write_text("upstream: smtp://127.0.0.1:2600\n" + text)
    return Runtime.from_document(load(path.read_text(), str(path)))


def test_state_policy_shorthand_and_mapping(tmp_path: Path):
    assert _doc(tmp_path, "").policy.state == State(url="memory")
    runtime = _doc(tmp_path, "state: redis://127.0.0.1:6379/2\n")
    assert runtime.policy.state.url == "redis://127.0.0.1:6379/2"
    runtime = _doc(tmp_path, "state: {url: 'redis://h:1/0', timeout: 250ms, key_prefix: 'x:'}\n")
    assert runtime.policy.state == State(url="redis://h:1/0", timeout=0.25, key_prefix="x:")


def test_bad_state_and_workers_are_policy_errors_with_positions(tmp_path: Path):
    with pytest.raises(SourceError) as err:
        _doc(tmp_path, "state: mysql://db\n")
    assert err.value.messages == [
        f"{tmp_path / 'p.yaml'}:2:1: state: expected memory or redis://HOST:PORT/DB, "
        "got 'mysql://db'"
    ]
    with pytest.raises(SourceError) as err:
        _doc(tmp_path, "workers: 2\nlisten: [{address: '127.0.0.1:0'}]\n")
    assert "workers > 1 needs fixed listen ports" in err.value.messages[0]
    with pytest.raises(SourceError) as err:
        _doc(tmp_path, "workers: 0\n")
    assert ":2:1: workers: Input should be greater than or equal to 1" in err.value.messages[0]


def test_runtimes_with_the_same_state_settings_share_one_backend(tmp_path: Path):
    async def go() -> None:
        old, new = _doc(tmp_path, ""), _doc(tmp_path, "")
        await old.start()
        await new.start()  # a reload: the new runtime starts before the old one stops
        assert old.state is new.state is not None
        backend = new.state
        assert isinstance(backend, MemoryState)
        await backend.rate("kept", 3600.0, 1)
        await old.stop()
        assert not (await backend.rate("kept", 3600.0, 1)).allowed  # the count survived
        await new.stop()
        assert state_store._shared == {}

    run(go())
