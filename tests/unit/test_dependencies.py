"""The packages depend on each other in one direction only.

hpc_agent runs on clusters without Django; djangoapp runs in web processes
that must never start a reactor; hpcd depends on both.  Each check imports
every module of a package in a fresh interpreter and looks at what came in.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROBE = """
import json, pkgutil, importlib, sys
package = sys.argv[1]
if sys.argv[2] == "django":
    import django
    django.setup()
root = importlib.import_module(package)
for info in pkgutil.walk_packages(root.__path__, package + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after_importing(package, with_django):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]),
               DJANGO_SETTINGS_MODULE="testsettings")
    out = subprocess.run([sys.executable, "-c", _PROBE, package,
                          "django" if with_django else "plain"],
                         env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return set(json.loads(out))


def _ours(modules, prefix):
    return sorted(m for m in modules if m == prefix or m.startswith(prefix + "."))


def test_the_agent_imports_neither_django_nor_the_daemon_nor_the_app():
    modules = _modules_after_importing("hpc_agent", with_django=False)
    assert "hpc_agent.agent" in modules  # the probe did import the package
    for other in ("django", "djangoapp", "hpcd"):
        assert _ours(modules, other) == [], f"hpc_agent pulls in {other}"


@pytest.mark.parametrize("forbidden", ["hpcd", "twisted.internet.reactor"])
def test_the_django_app_imports_nothing_of_the_daemon_and_no_reactor(forbidden):
    modules = _modules_after_importing("djangoapp", with_django=True)
    assert "djangoapp.models" in modules and "djangoapp.ipc" in modules
    assert _ours(modules, forbidden) == [], f"djangoapp pulls in {forbidden}"


def test_old_import_path_of_the_commands_still_works():
    from djangoapp import protocol
    from hpcd import commands

    for name in protocol.__all__:
        assert getattr(commands, name) is getattr(protocol, name)
