"""Install or upgrade the agent on a cluster in one command: over SSH, or as
local commands of hpcd's user for a ``localhost`` cluster."""

import shlex

from django.core.management.base import BaseCommand, CommandError

import hpc_agent
from djangoapp import agent_wheel
from djangoapp.ipc import HpcdError
from djangoapp.management.commands._clusters import find_cluster

FIND_PYTHON = (
    "for p in python3.13 python3.12 python3.11 python3.10 python3; do "
    "if command -v $p >/dev/null 2>&1 && "
    "$p -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; "
    "then command -v $p; exit 0; fi; done; "
    "echo 'no Python 3.10+ with venv and ensurepip on the PATH' >&2; exit 1")


class Command(BaseCommand):
    help = ("Install or upgrade the agent on a cluster over SSH (for 'localhost', locally as "
            "hpcd's user): create the agent directory (client_path), a virtual environment "
            "in it with a Python 3.10+ found there, install the agent from a wheel uploaded "
            "from here, and write settings.py if missing.  hpcd must be running (it makes "
            "the connection).")

    def add_arguments(self, parser):
        parser.add_argument("cluster", help="the cluster's id or host name")
        parser.add_argument("--python", help="the Python on the cluster to build the "
                                             "virtual environment with (default: search)")
        parser.add_argument("--pip-args", default="",
                            help="extra pip arguments, e.g. '--index-url URL' for a mirror")

    def handle(self, cluster, python, pip_args, **options):
        cluster = find_cluster(cluster)
        self.directory = shlex.quote(cluster.client_path)
        self.step_number = 0
        try:
            with cluster.get_ssh_connection() as shell:
                self.shell = shell
                self.install(cluster, python, pip_args)
        except HpcdError as e:
            raise CommandError(str(e)) from None

    def step(self, title, command, stdin=b"", timeout=120):
        self.step_number += 1
        self.stdout.write(f"[{self.step_number}/7] {title} ... ", ending="")
        self.stdout.flush()
        result = self.shell.exec_command(command, stdin=stdin, timeout=timeout)
        if result.exit_status != 0:
            self.stdout.write(self.style.ERROR("failed"))
            output = (result.stderr or result.stdout).decode("utf-8", "replace").strip()
            raise CommandError(f"{title} failed ({result.signal or result.exit_status}): "
                               f"{output[-3000:] or 'no output'}")
        output = result.stdout.decode("utf-8", "replace").strip()
        self.stdout.write(self.style.SUCCESS("ok") + (f" ({output.splitlines()[-1]})"
                                                      if output else ""))
        return output

    def install(self, cluster, python, pip_args):
        d = self.directory
        python = self.step("finding Python", f"command -v {shlex.quote(python)}"
                           if python else FIND_PYTHON)
        self.step(f"creating {cluster.client_path}", f"mkdir -p {d}/log {d}/jobs {d}/.install")
        self.step("creating the virtual environment",
                  f"cd {d} && if [ -x venv/bin/python ]; then echo 'exists'; "
                  f"else {shlex.quote(python)} -m venv venv && echo 'created'; fi", timeout=300)
        name, wheel = agent_wheel.build()
        self.step(f"uploading {name} ({len(wheel) // 1024} KiB)",
                  f"cat > {d}/.install/{shlex.quote(name)}", stdin=wheel)
        self.step("installing it with pip",
                  f"cd {d} && venv/bin/python -m pip install --quiet --disable-pip-version-check"
                  f" --upgrade {pip_args} .install/{shlex.quote(name)}", timeout=1800)
        self.step("writing settings.py if missing", f"cd {d} && venv/bin/python -m hpc_agent "
                                                    "init .")
        version = self.step("checking", f"cd {d} && venv/bin/python -m hpc_agent --version")
        if version != hpc_agent.__version__:
            raise CommandError(f"the cluster reports agent version {version!r}, expected "
                               f"{hpc_agent.__version__!r}")
        self.stdout.write(self.style.SUCCESS(
            f"agent {version} installed in {cluster.client_path}; "
            "connect with HpcCluster.try_connect() or the admin's 'Connect now'"))
