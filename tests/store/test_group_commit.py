"""Leader/follower group commit: batching, hand-over, error isolation."""

from __future__ import annotations

import threading

import pytest

from memosd.store.group_commit import GroupCommitter, Submission


def test_lone_caller_runs_its_own_batch_in_its_own_thread() -> None:
    seen: list[tuple[list[int], str]] = []

    def process(batch: list[Submission[int]]) -> None:
        seen.append(([s.payload for s in batch], threading.current_thread().name))
        for s in batch:
            s.resolve(s.payload * 2)

    committer: GroupCommitter[int] = GroupCommitter(process, max_batch=8)
    assert committer.submit(21) == 42
    assert seen == [([21], threading.current_thread().name)]


def test_concurrent_callers_share_batches_and_all_get_their_result() -> None:
    batches: list[int] = []
    gate = threading.Event()

    def process(batch: list[Submission[int]]) -> None:
        batches.append(len(batch))
        gate.wait(0.01)  # while the leader "fsyncs", others queue up
        for s in batch:
            s.resolve(s.payload + 1)

    committer: GroupCommitter[int] = GroupCommitter(process, max_batch=16)
    results: dict[int, int] = {}

    def call(n: int) -> None:
        results[n] = committer.submit(n)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: n + 1 for n in range(64)}
    assert sum(batches) == 64
    assert len(batches) < 64  # somebody shared a batch
    assert max(batches) <= 16


def test_failures_reach_only_their_submission() -> None:
    def process(batch: list[Submission[int]]) -> None:
        for s in batch:
            if s.payload < 0:
                s.fail(ValueError("negative"))
            else:
                s.resolve(s.payload)

    committer: GroupCommitter[int] = GroupCommitter(process, max_batch=4)
    with pytest.raises(ValueError, match="negative"):
        committer.submit(-1)
    assert committer.submit(3) == 3


def test_a_crashing_batch_fails_its_callers_and_leadership_moves_on() -> None:
    calls = {"n": 0}

    def process(batch: list[Submission[int]]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("bug in process")
        for s in batch:
            s.resolve(s.payload)

    committer: GroupCommitter[int] = GroupCommitter(process, max_batch=4)
    with pytest.raises(RuntimeError):
        committer.submit(1)
    assert committer.submit(2) == 2


def test_submit_nowait_is_led_by_the_standby_thread() -> None:
    threads: list[str] = []

    def process(batch: list[Submission[int]]) -> None:
        threads.append(threading.current_thread().name)
        for s in batch:
            s.resolve(s.payload * 10)

    committer: GroupCommitter[int] = GroupCommitter(process, max_batch=8)
    done = threading.Event()
    results: list[int] = []

    def on_done(sub: Submission[int]) -> None:
        results.append(sub.outcome())
        if len(results) == 3:
            done.set()

    for n in range(3):
        committer.submit_nowait(n, on_done)
    assert done.wait(5)
    assert sorted(results) == [0, 10, 20]
    assert set(threads) == {"memosd-committer"}
    assert committer.submit(7) == 70  # blocking callers still lead themselves
    committer.close()


def test_a_raising_completion_callback_fails_nobody_else() -> None:
    def process(batch: list[Submission[int]]) -> None:
        for s in batch:
            s.resolve(s.payload + 1)

    committer: GroupCommitter[int] = GroupCommitter(process, max_batch=8)
    delivered = threading.Event()
    got: list[int] = []

    def broken(sub: Submission[int]) -> None:
        raise RuntimeError("the caller's future was cancelled")

    def good(sub: Submission[int]) -> None:
        got.append(sub.outcome())
        delivered.set()

    first = committer.submit_nowait(1, broken)
    committer.submit_nowait(2, good)
    assert delivered.wait(5)
    assert got == [3]
    assert first.done
    assert first.outcome() == 2
    assert committer.submit(5) == 6  # the committer still leads
    committer.close()


def test_a_second_outcome_is_ignored_and_the_first_stands() -> None:
    def process(batch: list[Submission[int]]) -> None:
        for s in batch:
            s.resolve(s.payload)
            s.fail(RuntimeError("resolved twice by a buggy batch"))

    committer: GroupCommitter[int] = GroupCommitter(process, max_batch=8)
    assert committer.submit(4) == 4
    assert committer.submit(5) == 5
    committer.close()


def test_followers_are_woken_one_after_another_and_an_abandoned_one_passes_the_chain_on() -> None:
    """The leader wakes the first follower, each woken follower the next
    (see the module doc); a follower whose wait was interrupted never stops
    the chain: whoever takes its released lock wakes the next one."""
    gate = threading.Event()
    first = threading.Event()

    def process(batch: list[Submission[int]]) -> None:
        first.set()
        gate.wait(5)
        for s in batch:
            s.resolve(s.payload)

    committer: GroupCommitter[int] = GroupCommitter(process, max_batch=64)
    leader = threading.Thread(target=committer.submit, args=(0,))
    leader.start()
    assert first.wait(5)  # the leader is inside process(); the rest queue up
    results: dict[int, int] = {}

    def call(n: int) -> None:
        results[n] = committer.submit(n)

    followers = [threading.Thread(target=call, args=(n,)) for n in (1, 3)]
    for t in followers:
        t.start()
    while len(committer._pending) < 2:
        threading.Event().wait(0.001)
    # Between them, a caller that queued and then gave up waiting (an
    # interrupted wait): it will never pass the chain on itself.
    abandoned: Submission[int] = Submission(2)
    abandoned._abandoned = True
    with committer._mutex:
        committer._pending.insert(1, abandoned)
    gate.set()
    for t in [leader, *followers]:
        t.join(5)
        assert not t.is_alive()
    assert results == {1: 1, 3: 3}
    assert abandoned.done
    assert abandoned.outcome() == 2
    committer.close()
