"""How fast a burst of jobs goes from submit() to SUBMITTED.

    .venv/bin/python bench/dispatch.py [--jobs 10000] [--scheduler instant|local]
        [--submitters 1|4] [--via submit|submit_many]
    HPC_TEST_DB=postgres HPC_TEST_DB_NAME=test_hpc_bench .venv/bin/python bench/dispatch.py

A real hpcd and a real local agent.  ``--submitters`` Django processes
(bench/_submitter.py) submit ``--jobs`` new jobs between them at once, each
with HpcJob().submit() in a loop or with one HpcJob.objects.submit_many()
call (``--via``); the clock runs from the start signal until every job has
reached SUBMITTED or a later state in the database.  ``--scheduler
instant`` is bench/_instant_scheduler.py, which accepts at once (what is
measured is hpcd and the agent); ``local`` is the real local scheduler
running ``true``.  Prints ``name: value unit`` lines.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

from _env import cpu_seconds, django_environment

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--scheduler", choices=("instant", "local"), default="instant")
    parser.add_argument("--submitters", type=int, default=1)
    parser.add_argument("--via", choices=("submit", "submit_many"), default="submit")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--keep-logs", metavar="DIR", help="copy hpcd's and the agent's logs "
                        "there at the end")
    args = parser.parse_args()
    with django_environment() as tmp:
        from django.db import connection

        from djangoapp.models import HpcCluster, HpcJob
        from harness import Hpcd, agent_pid, kill_agent, make_agent_dir, wait_for
        from hpc_agent.status import JobStatus

        agent = os.path.join(tmp, "agent")
        settings = {}
        if args.scheduler == "instant":
            settings["HPC_SCHEDULER_CLASS"] = "_instant_scheduler.Instant"
        make_agent_dir(agent, **settings)
        shutil.copy(os.path.join(HERE, "_instant_scheduler.py"), agent)
        daemon = Hpcd(tmp).start()
        submitters = []
        try:
            cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent)
            cluster.try_connect()
            wait_for(cluster.is_connected, what="the agent")
            # For a profiler (py-spy record --pid).
            print(f"pids: hpcd {daemon.process.pid} agent {agent_pid(agent)}", file=sys.stderr,
                  flush=True)
            env = daemon.environment()
            shares = [args.jobs // args.submitters + (i < args.jobs % args.submitters)
                      for i in range(args.submitters)]
            submitters = [subprocess.Popen(
                [sys.executable, os.path.join(HERE, "_submitter.py"), str(n), args.via],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for n in shares]
            for s in submitters:
                assert s.stdout.readline().strip() == "ready"
            pids = {"hpcd": daemon.process.pid, "agent": agent_pid(agent)}
            cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
            started = time.monotonic()
            for s in submitters:
                s.stdin.write("go\n")
                s.stdin.flush()
            waiting = (JobStatus.DRAFT, JobStatus.PENDING, JobStatus.SUBMITTING)

            def all_submitted():
                total = HpcJob.objects.count()
                behind = HpcJob.objects.filter(job_status__in=[int(s) for s in waiting]).count()
                return total == args.jobs and behind == 0

            wait_for(all_submitted, timeout=args.timeout, interval=0.1,
                     what="every job to reach SUBMITTED")
            elapsed = time.monotonic() - started
            cpu = {name: cpu_seconds(pid) - cpu[name] for name, pid in pids.items()}
            submit_seconds = max(float(s.stdout.readline().split()[1]) for s in submitters)
            errors = HpcJob.objects.filter(job_status=JobStatus.ERROR).count()
            name = f"dispatch_{args.scheduler}_{args.via}_{args.submitters}"
            print(f"{connection.vendor}: {args.jobs} jobs, {args.submitters} submitter(s) "
                  f"using {args.via}, the {args.scheduler} scheduler")
            print(f"{name}: {args.jobs / elapsed:.0f} jobs/s")
            print(f"{name}_seconds: {elapsed:.2f} s")
            print(f"{name}_submit_rate: {args.jobs / submit_seconds:.0f} jobs/s into the database")
            print(f"{name}_errors: {errors} jobs")
            for detail in HpcJob.objects.filter(job_status=JobStatus.ERROR).values_list(
                    "job_details", flat=True).distinct()[:3]:
                print(f"  error: {detail[:300]}", file=sys.stderr)
            for process, seconds in cpu.items():
                print(f"{name}_{process}_cpu: {seconds / args.jobs * 1000:.2f} ms per job")
        finally:
            for s in submitters:
                s.kill()
            daemon.stop()
            kill_agent(agent)
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                shutil.copy(daemon.log_path, args.keep_logs)
                for name in glob.glob(os.path.join(agent, "*.log")):
                    shutil.copy(name, args.keep_logs)


if __name__ == "__main__":
    main()
