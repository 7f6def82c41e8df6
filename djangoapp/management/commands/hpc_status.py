"""``manage.py hpc_status``: is hpcd up, and how are the clusters and jobs doing?

What only hpcd knows (its version and uptime, which agents are connected,
transfers and requests in flight) comes from its ``Status`` command over the
Unix socket; the rest (clusters, jobs by state, the oldest open job, the
dispatch backlog) is read from the database here, so the command says as
much as it can when hpcd is down.  It exits with status 1 when hpcd does not
answer: a health probe for scripts and monitoring.
"""

import json
import time
from datetime import datetime, timezone

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, Max

from djangoapp import ipc, protocol
from djangoapp.models import HpcCluster, HpcJob
from hpc_agent.status import ACTIVE, NEEDS_DISPATCH, JobStatus

#: Started and not finished: the states a stuck job is in.
OPEN = ACTIVE | {JobStatus.PENDING, JobStatus.DELETING}


def duration(seconds):
    """``"45 s"``, ``"12 min"``, ``"3 h 05 min"``, ``"2 d 4 h"``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def _iso(when):
    if when is None:
        return None
    if isinstance(when, (int, float)):
        when = datetime.fromtimestamp(when, timezone.utc)
    return when.isoformat(timespec="seconds")


def _epoch(when):
    return when.timestamp() if when is not None else None


def ask_hpcd(timeout, wait):
    """``(live status or None, error text or None)``; retries for ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return ipc.call(protocol.Status, timeout=timeout)["status"], None
        except protocol.HpcdError as e:
            if time.monotonic() >= deadline:
                return None, str(e)
        time.sleep(0.5)


def gather(live, error):
    """Everything the command shows, as JSON-able data."""
    now = time.time()
    live_clusters = {c["id"]: c for c in (live or {}).get("clusters", [])}
    counts = {}
    for row in (HpcJob.objects.order_by().values("cluster_id", "job_status")
                .annotate(n=Count("id"))):
        by_state = counts.setdefault(row["cluster_id"], {})
        by_state[JobStatus(row["job_status"]).name] = row["n"]

    clusters = []
    for cluster in HpcCluster.objects.order_by("id"):
        mine = live_clusters.get(cluster.pk, {})
        online = bool(mine.get("online")) if live else False
        if online:
            since = _epoch(cluster.connected_since) or mine.get("since")
        else:
            since = mine.get("since") if live else None
        oldest = (HpcJob.objects.filter(cluster=cluster, job_status__in=[int(s) for s in OPEN])
                  .annotate(last_change=Max("status_changes__time"))
                  .order_by("last_change", "id").values("id", "job_status", "last_change")
                  .first())
        clusters.append({
            "id": cluster.pk,
            "host_name": cluster.host_name,
            "client_path": cluster.client_path,
            "enabled": cluster.enabled,
            "online": online,
            "since": _iso(since),
            "since_seconds": now - since if since else None,
            "agent_version": mine.get("agent_version"),
            "agent_host": mine.get("agent_host"),
            "scheduler": mine.get("scheduler"),
            "launch_failures": mine.get("launch_failures", 0),
            "last_error": None if online else (cluster.status_detail or None),
            "jobs": counts.get(cluster.pk, {}),
            "oldest_open_job": oldest and {
                "id": oldest["id"],
                "state": JobStatus(oldest["job_status"]).name,
                "since": _iso(oldest["last_change"]),
                "age_seconds": (now - oldest["last_change"].timestamp()
                                if oldest["last_change"] else None),
            },
        })

    backlog = {s.name: 0 for s in sorted(NEEDS_DISPATCH)}
    for by_state in counts.values():
        for state in backlog:
            backlog[state] += by_state.get(state, 0)
    backlog["without_cluster"] = counts.get(None, {}).get("PENDING", 0)
    backlog["in_flight"] = live.get("dispatch_in_flight") if live else None

    hpcd = {"answering": live is not None, "error": error}
    if live:
        hpcd.update({
            "version": live["version"], "pid": live["pid"], "started": _iso(live["started"]),
            "uptime_seconds": live["uptime_seconds"], "agents_url": live["agents_url"],
            "agents_connected": live["agents_connected"],
            "db_tasks_waiting": live["db_tasks_waiting"],
            "db_tasks_running": live["db_tasks_running"], "db_threads": live["db_threads"],
        })
    return {
        "hpcd": hpcd,
        "clusters": clusters,
        "jobs_without_cluster": counts.get(None, {}),
        "transfers": live.get("transfers") if live else None,
        "backlog": backlog,
    }


def _jobs_text(by_state):
    if not by_state:
        return "-"
    order = {s.name: int(s) for s in JobStatus}
    return ", ".join(f"{state} {n}" for state, n in sorted(by_state.items(),
                                                           key=lambda kv: order[kv[0]]))


def render(data):
    """The plain-text report."""
    lines = []
    hpcd = data["hpcd"]
    if hpcd["answering"]:
        lines.append(f"hpcd: answering; version {hpcd['version']}, pid {hpcd['pid']}, "
                     f"up {duration(hpcd['uptime_seconds'])}")
        lines.append(f"  agents connect to {hpcd['agents_url']}; "
                     f"{hpcd['agents_connected']} connected")
        lines.append(f"  database tasks: {hpcd['db_tasks_waiting']} waiting, "
                     f"{hpcd['db_tasks_running']} running, {hpcd['db_threads']} threads")
    else:
        lines.append(f"hpcd: NOT ANSWERING: {hpcd['error']}")
    lines.append("")

    rows = [("ID", "CLUSTER", "STATE", "SINCE", "AGENT", "JOBS", "OLDEST OPEN JOB")]
    for c in data["clusters"]:
        if not c["enabled"]:
            state = "disabled"
        elif c["online"]:
            state = "online"
        else:
            state = "offline" if hpcd["answering"] else "unknown"
        since = duration(c["since_seconds"]) if c["since_seconds"] is not None else "-"
        agent = c["agent_version"] or "-"
        oldest = c["oldest_open_job"]
        oldest_text = (f"job {oldest['id']} {oldest['state']} for {duration(oldest['age_seconds'])}"
                       if oldest and oldest["age_seconds"] is not None else
                       f"job {oldest['id']} {oldest['state']}" if oldest else "-")
        rows.append((str(c["id"]), c["host_name"], state, since, agent, _jobs_text(c["jobs"]),
                     oldest_text))
    if len(rows) == 1:
        lines.append("no clusters (create an HpcCluster: see the README)")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths))
                         + "  " + row[-1])
    for c in data["clusters"]:
        if c["last_error"] or c["launch_failures"]:
            failures = (f" ({c['launch_failures']} failed launches)"
                        if c["launch_failures"] else "")
            lines.append(f"  cluster {c['id']} {c['host_name']}{failures}: "
                         f"{c['last_error'] or '-'}")
    if data["jobs_without_cluster"]:
        lines.append(f"jobs without a cluster: {_jobs_text(data['jobs_without_cluster'])}")
    lines.append("")

    transfers = data["transfers"]
    if transfers is None:
        lines.append("transfers: unknown (hpcd is not answering)")
    elif not transfers:
        lines.append("transfers: none in flight")
    else:
        lines.append(f"transfers: {len(transfers)} in flight")
        for t in transfers:
            size = f" of {t['size']}" if t["size"] is not None else ""
            lines.append(f"  cluster {t['cluster']} job {t['job']} {t['path']}: "
                         f"{t['bytes']}{size} bytes in {duration(t['seconds'])}")
    backlog = data["backlog"]
    waiting = ", ".join(f"{s} {backlog[s]}" for s in ("PENDING", "SUBMITTING", "CANCELLING",
                                                      "DELETING"))
    in_flight = backlog["in_flight"] if backlog["in_flight"] is not None else "unknown"
    lines.append(f"dispatch backlog: {waiting}; {backlog['without_cluster']} PENDING without "
                 f"a cluster; {in_flight} awaiting an agent's answer")
    return "\n".join(lines)


class Command(BaseCommand):
    help = ("Show whether hpcd answers (version, uptime), each cluster's connection and "
            "jobs, transfers in flight and the dispatch backlog.  Exits with status 1 when "
            "hpcd does not answer.")

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", dest="as_json",
                            help="print JSON instead")
        parser.add_argument("--timeout", type=float, default=5.0,
                            help="seconds to wait for hpcd's answer (default 5)")
        parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                            help="keep asking for up to this long until hpcd answers "
                                 "(after starting it)")

    def handle(self, *args, as_json=False, timeout=5.0, wait=0.0, **options):
        live, error = ask_hpcd(timeout, wait)
        data = gather(live, error)
        self.stdout.write(json.dumps(data, indent=2, sort_keys=True) if as_json
                          else render(data))
        if live is None:
            raise CommandError("hpcd is not answering", returncode=1)
