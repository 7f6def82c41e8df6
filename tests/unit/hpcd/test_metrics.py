"""What hpcd counts (hpcd.metrics) and how /metrics shows it, without a daemon."""

import pytest
from twisted.logger import Logger, LogPublisher

from hpcd import metrics

prometheus = pytest.importorskip("prometheus_client", reason="the metrics extra is missing")


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = metrics.Histogram(buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    assert h.snapshot() == ([("0.1", 2), ("1.0", 3), ("+Inf", 4)], pytest.approx(2.65))
    assert h.count == 4


def test_database_stats_follow_a_task_through_the_queue():
    stats = metrics.DatabaseStats()
    stats.queued()
    stats.queued()
    assert (stats.waiting, stats.running) == (2, 0)
    stats.started("apply_updates", 0.002)
    assert (stats.waiting, stats.running) == (1, 1)
    stats.finished("apply_updates", 0.002, 0.03)
    assert (stats.waiting, stats.running) == (1, 0)
    assert stats.wait["apply_updates"].count == 1
    assert stats.total["apply_updates"].snapshot()[1] == pytest.approx(0.032)


def test_event_stats_count_the_job_events_the_log_carries():
    stats = metrics.EventStats()
    log = Logger(namespace="hpcd.test", observer=LogPublisher(stats))
    for job in (1, 2):
        log.info("cluster {cluster} job {job}: {action} sent", cluster=1, job=job,
                 action="submit", hpc_event="dispatched")
        log.info("answered", action="submit", seconds=0.02, hpc_event="dispatch_answered")
    log.info("cancel", action="cancel", hpc_event="dispatched")
    log.info("changed", new="RUNNING", hpc_event="state_change")
    log.warn("refused", reason="bad_frame", hpc_event="input_refused")
    log.warn("an ordinary warning")
    counts, seconds = stats.snapshot()
    assert counts["dispatched"] == {"submit": 2, "cancel": 1}
    assert counts["state_changes"] == {"RUNNING": 1}
    assert counts["refused_inputs"] == {"bad_frame": 1}
    assert seconds["submit"].count == 2


class FakeListener:
    def __init__(self):
        self.daemon = type("Daemon", (), {})()
        self.daemon.event_stats = metrics.EventStats()
        self.daemon.store = type("Store", (), {"stats": metrics.DatabaseStats()})()
        self.job_counts = {("1", "RUNNING"): 2, ("", "PENDING"): 1}

    def live(self):
        return {"version": "9.9", "started": 1000.0, "agents_connected": 1,
                "clusters": [{"online": True}, {"online": False}, {"online": False}],
                "dispatch_in_flight": 3, "transfers": [{"bytes": 10}], "transfer_bytes": 110,
                "transfers_done": {"ok": 2, "failed": 1}, "db_tasks_waiting": 4,
                "db_tasks_running": 1}


def test_the_collector_exposes_every_family_in_the_text_format():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    listener = FakeListener()
    listener.daemon.event_stats({"hpc_event": "dispatched", "action": "submit"})
    listener.daemon.event_stats({"hpc_event": "dispatch_answered", "action": "submit",
                                 "seconds": 0.3})
    listener.daemon.store.stats.queued()
    listener.daemon.store.stats.started("work", 0.001)
    listener.daemon.store.stats.finished("work", 0.001, 0.004)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics._Collector(listener))
    text = generate_latest(registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("hpcd_info", (("version", "9.9"),))] == 1
    assert samples[("hpcd_clusters", (("state", "online"),))] == 1
    assert samples[("hpcd_clusters", (("state", "offline"),))] == 2
    assert samples[("hpcd_jobs", (("cluster", "1"), ("state", "RUNNING")))] == 2
    assert samples[("hpcd_jobs", (("cluster", ""), ("state", "PENDING")))] == 1
    assert samples[("hpcd_dispatched_total", (("action", "submit"),))] == 1
    assert samples[("hpcd_dispatch_seconds_bucket", (("action", "submit"), ("le", "0.5")))] == 1
    assert samples[("hpcd_dispatch_seconds_bucket", (("action", "submit"), ("le", "0.25")))] == 0
    assert samples[("hpcd_dispatch_in_flight", ())] == 3
    assert samples[("hpcd_transfer_bytes_total", ())] == 110
    assert samples[("hpcd_transfers_active", ())] == 1
    assert samples[("hpcd_transfers_total", (("outcome", "failed"),))] == 1
    assert samples[("hpcd_db_tasks", (("state", "waiting"),))] == 4
    assert samples[("hpcd_db_task_run_seconds_count", (("task", "work"),))] == 1
