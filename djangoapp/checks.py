"""Django system checks for this app's settings.

``manage.py check`` runs them, and so does ``twistd hpcd`` before it listens
anywhere (it refuses to start on an error).  Each message says what to change.

======================  ========  =================================================
id                      level     what
======================  ========  =================================================
hpc.E001                error     HPC_JOB_CLASS cannot be imported
hpc.E002                error     HPC_JOB_CLASS is not HpcJob or a subclass of it
hpc.E003                error     the socket's directory does not exist (in hpcd;
                                  a warning, hpc.W003, in other Django processes)
hpc.E004                error     the socket's directory is world-writable
hpc.W001                warning   SQLite without ``transaction_mode: IMMEDIATE``
hpc.W002                warning   an HPC_* setting this app does not know
======================  ========  =================================================

A missing socket directory is an error only for hpcd, which cannot listen
there: a web host may run ``migrate`` before hpcd first started and made
its RuntimeDirectory.  hpcd sets :data:`IN_HPCD` before it runs the checks.
"""

import difflib
import os

from django.apps import apps
from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.utils.module_loading import import_string

from djangoapp.conf import DEFAULTS, hpc_settings

#: True in hpcd (set by hpcd.service before it runs the checks).
IN_HPCD = False


def resolve_job_class(name):
    """The class HPC_JOB_CLASS names: a dotted path ("myapp.models.Job") or
    Django's short model form ("myapp.Job").  Raises ImportError or
    LookupError saying what was not found."""
    if name.count(".") == 1:
        try:
            return apps.get_model(name)
        except (LookupError, ValueError):
            pass  # maybe a module and a class: try the import
    return import_string(name)


@register(Tags.models)
def check_job_class(app_configs=None, **kwargs):
    from djangoapp.models import HpcJob

    name = hpc_settings.HPC_JOB_CLASS
    try:
        cls = resolve_job_class(name)
    except (ImportError, LookupError, ValueError) as e:
        return [Error(
            f"HPC_JOB_CLASS = {name!r} cannot be imported: {e}",
            hint="Give the dotted path of your job model, e.g. 'myapp.models.MyJob', a "
                 "subclass of djangoapp.models.HpcJob; leave it unset for HpcJob itself.",
            id="hpc.E001")]
    if not (isinstance(cls, type) and issubclass(cls, HpcJob)):
        return [Error(
            f"HPC_JOB_CLASS = {name!r} is {cls!r}, not djangoapp.models.HpcJob or a "
            "subclass of it",
            hint="hpcd loads and updates jobs through this class: subclass HpcJob "
                 "(class MyJob(HpcJob): ...) and name that.",
            id="hpc.E002")]
    return []


@register()
def check_socket_directory(app_configs=None, **kwargs):
    from djangoapp import ipc

    path = ipc.socket_path()
    directory = os.path.dirname(os.path.abspath(path))
    is_default = not hpc_settings.HPC_IPC_UNIX_SOCKET
    if not os.path.isdir(directory):
        if is_default and os.path.isdir(os.path.dirname(directory)):
            return []  # hpcd makes the default's run/ itself
        level, check_id = (Error, "hpc.E003") if IN_HPCD else (Warning, "hpc.W003")
        return [level(
            f"the directory of HPC_IPC_UNIX_SOCKET ({path}) does not exist: {directory}"
            + ("" if IN_HPCD else "; Django cannot reach hpcd until it does"),
            hint="Create it, owned by hpcd's user and not writable by others. Under systemd, "
                 "RuntimeDirectory=hpcd in hpcd's unit creates /run/hpcd at each start (see "
                 "contrib/systemd/hpcd.service): set HPC_IPC_UNIX_SOCKET = "
                 "'/run/hpcd/hpcd.sock'.",
            id=check_id)]
    try:
        problem = ipc.socket_directory_problem(path)
    except OSError:
        return []  # not ours to see (another user's directory): hpcd will say
    if problem:
        return [Error(
            f"HPC_IPC_UNIX_SOCKET ({path}): {problem}",
            hint="Use a directory only hpcd's user can write, e.g. '/run/hpcd/hpcd.sock' "
                 "with RuntimeDirectory=hpcd under systemd, or a directory of your project "
                 "(mode 700 or 750); any local user who can write there could put a socket "
                 "of their own in hpcd's place, and Django would talk to it.",
            id="hpc.E004")]
    return []


@register()
def check_sqlite_immediate(app_configs=None, **kwargs):
    # Not tagged "database": it reads the settings only, so it runs by default.
    found = []
    for alias, db in settings.DATABASES.items():
        if not db.get("ENGINE", "").endswith("sqlite3"):
            continue
        mode = str(db.get("OPTIONS", {}).get("transaction_mode", "")).upper()
        if mode != "IMMEDIATE":
            found.append(Warning(
                f"database {alias!r} is SQLite without OPTIONS 'transaction_mode': "
                "'IMMEDIATE': Django and hpcd write it at the same time and some writes "
                "will fail with 'database is locked'",
                hint=f"DATABASES[{alias!r}]['OPTIONS'] = {{'transaction_mode': 'IMMEDIATE'}} "
                     "(Django 5.1+), or use PostgreSQL or MariaDB.",
                id="hpc.W001"))
    return found


@register()
def check_setting_names(app_configs=None, **kwargs):
    from hpc_agent.config import DEFAULTS as AGENT_DEFAULTS

    found = []
    for name in sorted(n for n in dir(settings) if n.startswith("HPC_")):
        if name in DEFAULTS:
            continue
        if name in AGENT_DEFAULTS:
            hint = ("That is an agent setting: it belongs in the agent directory's "
                    "settings.py on the cluster, not in Django's.")
        else:
            close = difflib.get_close_matches(name, DEFAULTS, n=1)
            hint = (f"Did you mean {close[0]}?" if close else
                    "See the settings table in the README (defaults in djangoapp/conf.py).")
        found.append(Warning(f"unknown setting {name}: hpc-job-controller does not read it",
                             hint=hint, id="hpc.W002"))
    return found
