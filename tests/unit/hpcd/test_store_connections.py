"""hpcd's pool threads keep their database connections across calls, and
replace one that broke (hpcd.store.run_thd)."""

import threading

import pytest
from django.db import connection, connections, transaction
from twisted.internet import reactor as _reactor  # noqa: F401  (the store needs one)

from djangoapp.models import HpcCluster
from hpcd import store


def _in_thread(f):
    """Run ``f`` in a thread of its own (a pool thread stands in), return its result."""
    box = {}

    def target():
        try:
            box["value"] = f()
        except BaseException as e:  # pragma: no cover - re-raised below
            box["error"] = e
        finally:
            connections.close_all()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _raw_id():
    return connection.connection  # the object, held: ids of freed objects get reused


def _count_clusters():
    return HpcCluster.objects.count()


def test_a_connection_is_kept_from_one_call_to_the_next(transactional_db):
    def two_calls():
        store.run_thd(_count_clusters)
        first = _raw_id()
        store.run_thd(_count_clusters)
        return first, _raw_id()

    first, second = _in_thread(two_calls)
    assert first is second


def test_a_broken_connection_is_replaced_before_the_next_call(transactional_db):
    def break_then_call():
        store.run_thd(_count_clusters)
        broken = _raw_id()
        connection.connection.close()  # the server went away
        with pytest.raises(Exception):
            store.run_thd(_count_clusters)
        assert connection.errors_occurred
        assert store.run_thd(_count_clusters) == 0
        return broken, _raw_id()

    broken, fresh = _in_thread(break_then_call)
    assert broken is not fresh


def test_a_connection_left_outside_autocommit_is_never_reused(transactional_db):
    def leave_autocommit_off():
        store.run_thd(_count_clusters)
        transaction.set_autocommit(False)  # a bug elsewhere forgot to restore it
        leaked = _raw_id()
        store.run_thd(_count_clusters)
        return leaked, _raw_id(), transaction.get_autocommit()

    leaked, fresh, autocommit = _in_thread(leave_autocommit_off)
    assert leaked is not fresh and autocommit


def test_an_idle_connection_is_checked_before_use(transactional_db, monkeypatch):
    checks = []
    real = store._works
    monkeypatch.setattr(store, "_works", lambda conn: checks.append(1) or real(conn))

    def calls():
        store.run_thd(_count_clusters)
        store.run_thd(_count_clusters)  # just used: no check
        store._last_use.at -= store.IDLE_CHECK_SECONDS + 1
        store.run_thd(_count_clusters)  # idle: checked once

    _in_thread(calls)
    assert len(checks) == 1


@pytest.mark.skipif(connection.vendor != "postgresql", reason="counts PostgreSQL backends")
def test_many_calls_on_a_pool_open_at_most_one_connection_per_thread(transactional_db):
    from twisted.python.threadpool import ThreadPool

    def backends():
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                           [connection.settings_dict["NAME"]])
            return cursor.fetchone()[0]

    before = _in_thread(backends)
    pool = ThreadPool(minthreads=1, maxthreads=4, name="test-db")
    pool.start()
    done = threading.Semaphore(0)
    try:
        for _ in range(200):
            pool.callInThread(lambda: (store.run_thd(_count_clusters), done.release()))
        for _ in range(200):
            assert done.acquire(timeout=30)
        during = _in_thread(backends)
    finally:
        pool.stop()
    assert during - before <= 4
