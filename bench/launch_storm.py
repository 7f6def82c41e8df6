"""How long many agents launched at once take to be online.

    .venv/bin/python bench/launch_storm.py [--agents 50]

A real hpcd and ``--agents`` clusters on localhost, each with an agent
directory of its own (real agents, real processes).  Every cluster is asked
to connect at once (HpcCluster.try_connect()); prints the seconds until
all are connected, until half were, the CPU time one agent took to start
(its import of Twisted, Autobahn and the agent's modules), the CPU time of
all the launch commands (each a foreground process that checks the
settings, forks the agent and waits for its word) and hpcd's CPU time
meanwhile.  Then the agents are stopped.  Prints ``name: value unit`` lines.
"""

import argparse
import os
import statistics
import sys
import time

from _env import children_cpu_seconds, cpu_seconds, django_environment


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args()
    with django_environment() as tmp:
        from djangoapp.models import HpcCluster
        from harness import Hpcd, agent_pid, kill_agent, make_agent_dir, wait_for

        directories = [make_agent_dir(os.path.join(tmp, f"agent-{i}"))
                       for i in range(args.agents)]
        clusters = HpcCluster.objects.bulk_create(
            [HpcCluster(host_name="localhost", client_path=d) for d in directories])
        daemon = Hpcd(tmp).start()
        print(f"pids: hpcd {daemon.process.pid}", file=sys.stderr, flush=True)
        try:
            hpcd_cpu = cpu_seconds(daemon.process.pid)
            launch_cpu = children_cpu_seconds(daemon.process.pid)
            started = time.monotonic()
            for cluster in clusters:
                cluster.try_connect()
            online_at = {}

            def all_online():
                now = time.monotonic() - started
                for pk in HpcCluster.objects.filter(online=True).values_list("pk", flat=True):
                    online_at.setdefault(pk, now)
                return len(online_at) == args.agents

            wait_for(all_online, timeout=args.timeout, interval=0.05,
                     what=f"{args.agents} agents to be online")
            times = sorted(online_at.values())
            hpcd_cpu = cpu_seconds(daemon.process.pid) - hpcd_cpu
            launch_cpu = children_cpu_seconds(daemon.process.pid) - launch_cpu
            cpu = [cpu_seconds(pid) for pid in map(agent_pid, directories) if pid]
            print(f"launch_storm_{args.agents}: {times[-1]:.2f} s until all online")
            print(f"launch_storm_{args.agents}_half: {times[len(times) // 2]:.2f} s")
            print(f"agent_start_cpu: {statistics.median(cpu):.2f} s (median of {len(cpu)})")
            print(f"launch_storm_{args.agents}_launch_cpu: {launch_cpu:.2f} s "
                  "(all launch commands)")
            print(f"launch_storm_{args.agents}_hpcd_cpu: {hpcd_cpu:.2f} s")
        finally:
            daemon.stop()
            for directory in directories:
                kill_agent(directory)


if __name__ == "__main__":
    main()
