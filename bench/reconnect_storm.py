"""How long many agents take to come back after hpcd restarts.

    .venv/bin/python bench/reconnect_storm.py [--agents 1000]

Simulated agents (bench/_swarm.py, one process) connect with resume tokens,
then hpcd is stopped and started again; prints the seconds from hpcd's
readiness until every agent is welcomed back (each reconnecting with the
resume token its last connection gave it, backing off like a real agent).
"""

import argparse
import json
import os
import subprocess
import sys
import time

from _env import django_environment

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--one-address", action="store_true",
                        help="all agents connect from 127.0.0.1 (clusters behind one NAT), "
                             "not from an address each")
    args = parser.parse_args()
    # Never launch real agents for the simulated clusters.
    os.environ["HPC_AGENT_RESUME_GRACE_SECONDS"] = "3600"
    with django_environment() as tmp:
        from djangoapp.models import HpcCluster, WebsocketToken
        from harness import Hpcd, websocket_port

        clusters = HpcCluster.objects.bulk_create(
            [HpcCluster(host_name="localhost", client_path=f"/nonexistent/{i}")
             for i in range(args.agents)])
        tokens = {str(c.pk): WebsocketToken.objects.issue(c.pk, "resume")[1] for c in clusters}
        token_file = os.path.join(tmp, "tokens.json")
        with open(token_file, "w") as f:
            json.dump(tokens, f)
        daemon = Hpcd(tmp).start()
        url = f"ws://127.0.0.1:{websocket_port(daemon)}"
        swarm = subprocess.Popen([sys.executable, os.path.join(HERE, "_swarm.py"), url,
                                  token_file] + (["one-address"] if args.one_address else []),
                                 stdout=subprocess.PIPE, text=True)
        try:
            first = swarm.stdout.readline().split()
            print(f"first_connect_{args.agents}: {float(first[2]):.2f} s")
            daemon.stop()
            assert swarm.stdout.readline().strip() == "lost"
            restarted = time.monotonic()
            # The same port again: the agents know no other.
            daemon.extra_env["HPC_WEBSOCKET_PORT"] = url.rsplit(":", 1)[1]
            daemon.start()
            ready = time.monotonic()
            back = swarm.stdout.readline().split()
            done = time.monotonic()
            print(f"hpcd_restart: {ready - restarted:.2f} s to READY")
            print(f"reconnect_{args.agents}: {done - ready:.2f} s after READY "
                  f"({float(back[2]):.2f} s after the drop)")
        finally:
            swarm.kill()
            daemon.stop()


if __name__ == "__main__":
    main()
