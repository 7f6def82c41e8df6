"""The demo: a local cluster on SQLite, a few jobs run through it.

It migrates a fresh SQLite database, writes an agent directory, starts hpcd
(``twistd hpcd``) and connects a ``localhost`` cluster, then submits jobs
through the public API and prints every state change as the database sees
it, the jobs' files and output, a cancel and a delete.  Everything lives in
``var/demo/`` and the daemon and agent are stopped at the end.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BASE = os.environ.setdefault("HPC_DEMO_DIR", os.path.join(REPO, "var", "demo"))
sys.path.insert(0, HERE)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")


def say(text=""):
    print(text, flush=True)


def start_hpcd():
    """twistd hpcd in the background; returns when it says READY=1."""
    notify_path = os.path.join(BASE, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(30)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONPATH=HERE)
    process = subprocess.Popen(
        [twistd, "--nodaemon", "--pidfile=", f"--logfile={BASE}/hpcd.log", "hpcd",
         "--settings", "settings"], cwd=HERE, env=env, stdout=subprocess.DEVNULL)
    try:
        notify.recv(16)
    except socket.timeout:
        process.kill()
        sys.exit(f"hpcd did not start; see {BASE}/hpcd.log")
    finally:
        notify.close()
    return process


def main():
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE)
    import django

    django.setup()
    from django.core.management import call_command

    say("1. A fresh SQLite database, migrated.")
    call_command("migrate", verbosity=0)

    agent = os.path.join(BASE, "agent")
    say(f"2. An agent directory: {agent} (python -m hpc_agent init, venv -> this one).")
    subprocess.run([sys.executable, "-m", "hpc_agent", "init", agent], check=True,
                   stdout=subprocess.DEVNULL)
    os.symlink(sys.prefix, os.path.join(agent, "venv"))
    with open(os.path.join(agent, "settings.py"), "a") as f:
        f.write("\nHPC_RECONNECT_SECONDS = 5  # the demo's agent leaves soon after hpcd\n")

    say("3. hpcd starts (twistd hpcd --settings settings).")
    hpcd = start_hpcd()
    try:
        run_jobs(agent)
    finally:
        hpcd.send_signal(signal.SIGTERM)
        hpcd.wait(timeout=20)
        stop_agent(agent)
    say(f"\nDone. hpcd's log: {BASE}/hpcd.log; the agent's: {agent}/log/agent.log")


def stop_agent(agent):
    try:
        with open(os.path.join(agent, "agent.lock")) as f:
            os.kill(int(f.read()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


_seen = {}


def watch(jobs, until, timeout=60):
    """Print each job's state whenever it changes, until ``until(job)`` holds for all."""
    seen = _seen
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, job in jobs.items():
            job.refresh_from_db()
            if seen.get(name) != (job.status, job.job_details):
                seen[name] = (job.status, job.job_details)
                detail = f"  ({job.job_details})" if job.job_details else ""
                say(f"   {time.strftime('%H:%M:%S')}  {name:<10} {job.status.name}{detail}")
        if all(until(job) for job in jobs.values()):
            return
        time.sleep(0.1)
    raise SystemExit("the demo's jobs did not finish in time")


def run_jobs(agent):
    from djangoapp.models import HpcCluster, HpcJob, JobStatus
    from hpc_agent.status import is_terminal

    cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent)
    say("4. A cluster 'localhost' and try_connect().")
    cluster.try_connect()
    started = time.monotonic()
    while not cluster.is_connected():
        if time.monotonic() - started > 30:
            cluster.refresh_from_db()
            raise SystemExit(f"the agent did not connect: {cluster.status_detail}")
        time.sleep(0.1)
    cluster.refresh_from_db()
    say(f"   online after {time.monotonic() - started:.1f} s: {cluster.status_detail}")

    say("5. Three jobs submitted; each state change as the database records it:")
    jobs = {
        "primes": HpcJob.objects.create(),
        "failing": HpcJob.objects.create(),
        "long": HpcJob.objects.create(),
    }
    jobs["primes"].submit({"script": (
        "echo 'primes below 50:' > primes.txt\n"
        "for n in $(seq 2 49); do\n"
        "  p=1; for d in $(seq 2 $((n-1))); do [ $((n % d)) -eq 0 ] && p=0 && break; done\n"
        "  [ $p -eq 1 ] && printf '%s ' $n >> primes.txt\n"
        "done\necho >> primes.txt\nsleep 1\n")})
    jobs["failing"].submit({"script": "echo 'about to fail' >&2\nexit 3\n"})
    jobs["long"].submit({"script": "sleep 300 & sleep 300\n"})
    watch(jobs, lambda j: is_terminal(j.status) or j.status == JobStatus.RUNNING)

    say("6. The long job is cancelled (its whole process group is killed):")
    jobs["long"].cancel()
    watch(jobs, lambda j: is_terminal(j.status))

    primes = jobs["primes"]
    say("7. The primes job's files, and its output streamed through hpcd:")
    for entry in primes.fetch_remote_file_list("/", True):
        kind = "dir " if entry["is_dir"] else f"{entry['size']:>4} B"
        say(f"   {kind}  {entry['path']}")
    response = primes.fetch_remote_file("primes.txt")
    say("   primes.txt: " + b"".join(response.streaming_content).decode().strip()
        .replace("\n", " "))
    response = jobs["failing"].fetch_remote_file("hpc-job.err")
    say("   failing job's stderr: " + b"".join(response.streaming_content).decode().strip())

    say("8. The primes job's history:")
    for change in primes.history():
        say(f"   {change.time:%H:%M:%S.%f}"[:-3] + f"  {JobStatus(change.old_status).name:>10} -> "
            f"{JobStatus(change.new_status).name:<10} by {change.source}")

    say("9. Its data deleted on the cluster:")
    primes.delete_job()
    watch({"primes": primes}, lambda j: j.status == JobStatus.DELETED)
    gone = not os.path.exists(os.path.join(agent, "jobs", str(primes.pk)))
    say(f"   working directory removed: {gone}")


if __name__ == "__main__":
    main()
