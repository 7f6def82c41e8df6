"""Makes ``twistd hpcd`` find the daemon.  No ``__init__.py`` above this file:
``twisted.plugins`` is Twisted's namespace, shared by every installed plugin."""

from twisted.application.service import ServiceMaker

hpcd = ServiceMaker(
    "hpcd",
    "hpcd.service",
    "The hpc-job-controller daemon: agents' websocket, Django's socket, launcher.",
    "hpcd",
)
