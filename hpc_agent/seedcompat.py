"""The seed's module names, so scheduler code written for it runs here.

The seed's cluster client (django_hpc_job_controller) ran from its own
directory, where ``scheduler/`` held its scheduler classes and ``settings/``
held a site's settings, scheduler file and templates.  A site's scheduler
file says ``from scheduler.slurm import Slurm``, its templates are named
``settings/<name>.sh`` and its ``HPC_SCHEDULER_CLASS`` is something like
``settings.mysite.MySlurm``.

Once the agent has loaded its scheduler class
(:meth:`hpc_agent.config.AgentSettings.scheduler_class`), an import hook
makes these names resolve in its process, with no package of those names in
the distribution:

``scheduler``, ``scheduler.scheduler``
    :class:`~hpc_agent.schedulers.base.Scheduler`, the base class.
``scheduler.status``
    ``JobStatus``: this project's, with the seed's names and numbers; its
    members are ints, as the seed's were.
``scheduler.local``, ``scheduler.slurm``
    ``Local`` and ``Slurm``: the built-in classes with the seed's default
    templates, ``settings/local.sh.template`` and
    ``settings/slurm.sh.template``, which makes them (and every subclass)
    seed-style classes: see :mod:`hpc_agent.schedulers.base`.
``settings``
    the ``settings/`` directory of the agent directory, when it has one (the
    agent's own ``settings.py`` is read as a file, never imported, so the
    two do not collide).

Template paths are taken from the agent directory, which plays the part of
the seed's client directory.  The agent directory is also on ``sys.path``, so
a scheduler file next to ``settings.py`` is named ``mysite.MySlurm``.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys

from hpc_agent.schedulers import local as _local
from hpc_agent.schedulers import slurm as _slurm
from hpc_agent.schedulers.base import Scheduler
from hpc_agent.status import JobStatus


class Local(_local.Local):
    """The seed's ``scheduler.local.Local``."""

    local_template = "settings/local.sh.template"


class Slurm(_slurm.Slurm):
    """The seed's ``scheduler.slurm.Slurm``."""

    slurm_template = "settings/slurm.sh.template"


Local.__module__ = "scheduler.local"
Slurm.__module__ = "scheduler.slurm"

#: The seed's modules and what each held that a site may import.
MODULES = {
    "scheduler": {},
    "scheduler.scheduler": {"Scheduler": Scheduler},
    "scheduler.status": {"JobStatus": JobStatus},
    "scheduler.local": {"Local": Local, "Scheduler": Scheduler, "JobStatus": JobStatus},
    "scheduler.slurm": {"Slurm": Slurm, "Scheduler": Scheduler, "JobStatus": JobStatus},
}


class SeedFinder:
    """Finds the seed's module names (first on ``sys.meta_path``).

    A meta path finder and loader by protocol (``find_spec``,
    ``create_module``, ``exec_module``), not by subclassing importlib.abc's
    classes: importlib.abc imports importlib.resources, a few ms more of
    every agent start, which hpcd may do fifty times at once.
    """

    def __init__(self):
        self.base_dir = None
        self.added_path = None  # the entry install() put on sys.path

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MODULES:
            return importlib.util.spec_from_loader(fullname, self,
                                                   is_package=fullname == "scheduler")
        if fullname == "settings" and self.base_dir:
            return self._settings_spec()
        return None

    def _settings_spec(self):
        directory = os.path.join(self.base_dir, "settings")
        if not os.path.isdir(directory):
            return None
        init = os.path.join(directory, "__init__.py")
        if os.path.isfile(init):
            return importlib.util.spec_from_file_location(
                "settings", init, submodule_search_locations=[directory])
        # No __init__.py: a namespace package of that one directory.
        spec = importlib.machinery.ModuleSpec("settings", None, is_package=True)
        spec.submodule_search_locations = [directory]
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__dict__.update(MODULES[module.__name__])


_finder = SeedFinder()


def install(base_dir):
    """Make the seed's names resolve for the agent directory ``base_dir``."""
    base_dir = os.path.abspath(base_dir)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    if _finder.base_dir != base_dir:
        # Another agent directory in this process (tests): forget its settings.
        for name in [n for n in sys.modules if n == "settings" or n.startswith("settings.")]:
            if _finder.base_dir and _is_under(sys.modules[name], _finder.base_dir):
                del sys.modules[name]
        if _finder.added_path in sys.path:
            sys.path.remove(_finder.added_path)
        _finder.base_dir, _finder.added_path = base_dir, None
    if base_dir not in sys.path:
        sys.path.append(base_dir)
        _finder.added_path = base_dir


def _is_under(module, directory):
    paths = list(getattr(module, "__path__", None) or []) + [getattr(module, "__file__", None)]
    return any(p and os.path.abspath(p).startswith(directory + os.sep) for p in paths)


def load_scheduler_class(dotted, base_dir):
    """The scheduler class ``dotted`` names, with the seed's names installed.

    Raises ValueError saying what is wrong and what to do.
    """
    install(base_dir)
    module_name, _, class_name = str(dotted).rpartition(".")
    if not module_name:
        raise ValueError(f"HPC_SCHEDULER_CLASS must be a dotted path module.Class, "
                         f"not {dotted!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"HPC_SCHEDULER_CLASS {dotted!r}: cannot import {module_name!r} "
                         f"({e}); files of your own go next to settings.py or in a "
                         f"settings/ directory of {base_dir}") from e
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise ValueError(f"HPC_SCHEDULER_CLASS {dotted!r}: {module_name} has no scheduler "
                         f"class {class_name!r} (a subclass of "
                         f"hpc_agent.schedulers.base.Scheduler, alias "
                         f"scheduler.scheduler.Scheduler)")
    return cls
