"""Wake-ups (alya.engine.waker) over a real LISTEN connection: a notification of a type wakes one idle claim
loop of that type, not every one, and is kept when no loop waits, so none is lost."""

from __future__ import annotations

import threading
import time

from alya import JobManager
from alya.engine.waker import Waker


def notify(jm: JobManager, app: str, op: str) -> None:
    with jm.store.tx() as q:
        q.notify_work(app, op)


def started(waker: Waker) -> Waker:
    """Start the waker and wait until its connection LISTENs: a notification before that is not delivered
    (a worker then finds the work at its next poll), which a loaded machine made these tests meet."""
    waker.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn = waker._listener._conn  # the test looks inside: the engine never needs to wait for this
        if conn is not None and not conn.closed:
            return waker
        time.sleep(0.01)
    raise AssertionError("the waker never connected")


def test_one_notification_wakes_one_claim_loop_of_its_type(jm: JobManager) -> None:
    waker = Waker(jm.store)
    try:
        started(waker)
        woke: list[str] = []
        lock = threading.Lock()

        def loop(name: str, key: str) -> None:
            if waker.wait_turn(key, 3.0):
                with lock:
                    woke.append(name)

        threads = [threading.Thread(target=loop, args=(f"t{i}", "wk/one")) for i in range(4)]
        threads.append(threading.Thread(target=loop, args=("other", "wk/two")))
        for t in threads:
            t.start()
        time.sleep(0.5)  # all five wait
        notify(jm, "wk", "one")
        time.sleep(1.0)
        assert len(woke) == 1 and woke[0].startswith("t"), woke  # one of the four, and not the other type
        notify(jm, "wk", "one")
        for t in threads:
            t.join()
        assert len(woke) == 2 and "other" not in woke, woke
    finally:
        waker.close()


def test_a_notification_while_nobody_waits_is_kept_for_the_next_wait(jm: JobManager) -> None:
    waker = Waker(jm.store)
    try:
        started(waker)
        assert not waker.wait_turn("wk/one", 0.3)  # registers the type; nothing notified
        notify(jm, "wk", "one")
        time.sleep(0.5)  # it arrives while nobody waits
        t0 = time.monotonic()
        assert waker.wait_turn("wk/one", 3.0) and time.monotonic() - t0 < 0.1
        assert not waker.wait_turn("wk/one", 0.3)  # taken once
        with jm.store.tx() as q:
            q.notify_any_work()  # recovery requeued rows of any type: every known type gets a turn
        assert waker.wait_turn("wk/one", 3.0)
    finally:
        waker.close()


def test_a_turn_given_back_wakes_the_next_loop(jm: JobManager) -> None:
    """A loop that took a turn and then could not claim (its task's time was up) gives it back: the
    notification is not lost with it."""
    waker = Waker(jm.store)
    try:
        started(waker)
        notify(jm, "wk", "one")
        assert waker.wait_turn("wk/one", 3.0)
        waker.give_back("wk/one")
        assert waker.wait_turn("wk/one", 0.1)
    finally:
        waker.close()


def test_a_nudge_ends_every_wait_of_its_type_and_takes_no_turn(jm: JobManager) -> None:
    """A bridge waiting for work whose flow run has started is nudged: it stops waiting at once, without a
    turn (none was notified), and the type's next notification still wakes a loop."""
    waker = Waker(jm.store)
    try:
        started(waker)
        results: list[tuple[bool, float]] = []

        def loop() -> None:
            t0 = time.monotonic()
            results.append((waker.wait_turn("wk/one", 5.0), time.monotonic() - t0))

        threads = [threading.Thread(target=loop) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        waker.nudge("wk/one")
        for t in threads:
            t.join(5)
        assert [r[0] for r in results] == [False, False] and all(r[1] < 1.0 for r in results), results
        notify(jm, "wk", "one")
        assert waker.wait_turn("wk/one", 3.0)  # the turn of a later notification is not lost
    finally:
        waker.close()
