"""The demo: a local cluster on SQLite, a few jobs run through it.

It migrates a fresh SQLite database, writes an agent directory, starts hpcd
(``twistd hpcd``) and connects a ``localhost`` cluster, then submits jobs
through the public API and prints every state change as the database sees
it, the jobs' files and output, a cancel and a delete.  Everything lives in
``var/demo/`` and the daemon and agent are stopped at the end.

With ``--web`` it starts the demo site instead (``demo/portal/``: clusters,
submit, live job states, a file browser) on Django's development server at
http://127.0.0.1:8000/ (``--port``), runs a few sample jobs, and keeps
running until Ctrl-C, then stops everything it started.
"""

import argparse
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BASE = os.environ.setdefault("HPC_DEMO_DIR", os.path.join(REPO, "var", "demo"))
sys.path.insert(0, HERE)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")


def say(text=""):
    print(text, flush=True)


def start_hpcd():
    """twistd hpcd in the background; returns when it says READY=1."""
    from hpcd import spawn

    env = dict(os.environ, PYTHONPATH=HERE)
    try:
        return spawn.start(
            [spawn.twistd(), "--nodaemon", "--pidfile=", f"--logfile={BASE}/hpcd.log", "hpcd",
             "--settings", "settings"], env=env, cwd=HERE, stdout=subprocess.DEVNULL)
    except spawn.NotReady as e:
        sys.exit(f"{e}; see {BASE}/hpcd.log")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--web", action="store_true",
                        help="start the demo site and keep it running until Ctrl-C")
    parser.add_argument("--port", type=int, default=8000,
                        help="the site's port on 127.0.0.1 (with --web; default 8000)")
    args = parser.parse_args(argv)
    if args.web:
        return web(args.port)
    agent = prepare()
    say("3. hpcd starts (twistd hpcd --settings settings).")
    hpcd = start_hpcd()
    try:
        run_jobs(agent)
    finally:
        hpcd.send_signal(signal.SIGTERM)
        hpcd.wait(timeout=20)
        stop_agent(agent)
    say(f"\nDone. hpcd's log: {BASE}/hpcd.log; the agent's: {agent}/log/agent.log")
    say("\nTo see the same in a browser: scripts/demo --web, then open "
        "http://127.0.0.1:8000/ and log in as demo / demo.")


def prepare():
    """A fresh SQLite database and agent directory; returns the agent's path."""
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
    return agent


def connect_cluster(agent):
    """The localhost cluster, connected (through the public API)."""
    from djangoapp.models import HpcCluster

    cluster = HpcCluster.objects.create(host_name="localhost", client_path=agent)
    cluster.try_connect()
    started = time.monotonic()
    while not cluster.is_connected():
        if time.monotonic() - started > 30:
            cluster.refresh_from_db()
            raise SystemExit(f"the agent did not connect: {cluster.status_detail}")
        time.sleep(0.1)
    cluster.refresh_from_db()
    return cluster, time.monotonic() - started


class _Stop(Exception):
    """SIGTERM, handled like Ctrl-C."""


def web(port):
    """The demo site: hpcd, a connected cluster, sample jobs and Django's
    development server, until Ctrl-C (or SIGTERM)."""
    def stop(signum, frame):
        raise _Stop()

    signal.signal(signal.SIGTERM, stop)
    agent = prepare()
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_superuser("demo", "demo@example.invalid", "demo")
    say("3. A user demo (password demo); hpcd starts.")
    hpcd = start_hpcd()
    server = None
    try:
        cluster, took = connect_cluster(agent)
        say(f"4. The cluster 'localhost' is online after {took:.1f} s.")
        submit_samples(cluster)
        say("5. Sample jobs submitted: primes, fails, progress (a minute of log lines), "
            "and words (an input file uploaded before it was submitted).")
        log = open(os.path.join(BASE, "web.log"), "ab")
        server = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "manage.py"), "runserver", "--noreload",
             f"127.0.0.1:{port}"], cwd=HERE, env=dict(os.environ, PYTHONPATH=HERE),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/"
        wait_for_site(url + "login/", server)
        say(f"\nThe demo site is at {url}  (log in as demo / demo)")
        say(f"Logs: {BASE}/web.log, {BASE}/hpcd.log, {agent}/log/agent.log. "
            "Ctrl-C stops everything.", )
        while server.poll() is None:
            time.sleep(0.5)
        say(f"The web server stopped; see {BASE}/web.log")
        return 1
    except (KeyboardInterrupt, _Stop):
        say("\nStopping the web server, hpcd and the agent.")
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        if hpcd.poll() is None:
            hpcd.send_signal(signal.SIGTERM)
        hpcd.wait(timeout=20)
        stop_agent(agent)


def wait_for_site(url, server, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the web server exited; see {BASE}/web.log")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the web server did not answer at {url}; see {BASE}/web.log")


def submit_samples(cluster):
    """A few jobs for the site to show, through the public API."""
    from djangoapp.models import HpcJob

    HpcJob.objects.create(cluster=cluster).submit({"name": "primes", "script": (
        "for n in $(seq 2 200); do\n"
        "  p=1; for d in $(seq 2 $((n-1))); do [ $((n % d)) -eq 0 ] && p=0 && break; done\n"
        "  [ $p -eq 1 ] && printf '%s ' $n >> primes.txt\n"
        "done\necho >> primes.txt\n")})
    HpcJob.objects.create(cluster=cluster).submit(
        {"name": "fails", "script": "echo 'about to fail' >&2\nexit 3\n"})
    HpcJob.objects.create(cluster=cluster).submit({"name": "progress", "script": (
        "mkdir -p logs\nfor i in $(seq 1 60); do\n"
        "  echo \"$(date +%T) step $i of 60\" >> logs/progress.log; sleep 1\ndone\n")})
    # An input file goes in before the job is submitted (the job needs its
    # cluster for that): upload_file makes the job's directory.
    words = HpcJob.objects.create(cluster=cluster)
    words.upload_file("input/poem.txt", io.BytesIO(
        b"Tyger Tyger, burning bright,\nIn the forests of the night;\n"))
    words.submit({"name": "words", "script": "wc -w input/poem.txt > count.txt\n"})


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
    from djangoapp.models import HpcJob, JobStatus
    from hpc_agent.status import is_terminal

    say("4. A cluster 'localhost' and try_connect().")
    cluster, took = connect_cluster(agent)
    say(f"   online after {took:.1f} s: {cluster.status_detail}")

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
    sys.exit(main())
