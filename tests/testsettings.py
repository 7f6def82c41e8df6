"""Django settings for the test suite and for the daemons the tests start.

The database comes from the environment (HPC_TEST_DB = sqlite, postgres or
mysql), so the same settings serve the SQLite, PostgreSQL and MariaDB tiers,
and an hpcd started by a test uses the very database the test set up
(HPC_TEST_DB_NAME).
"""

import os
import tempfile

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "testurls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "djangoapp",
    "testjobs",
    "seedportal",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]

_backend = os.environ.get("HPC_TEST_DB", "sqlite")
_name = os.environ.get("HPC_TEST_DB_NAME")
if _backend == "postgres":
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("HPC_TEST_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("HPC_TEST_PG_PORT", "5432"),
        "USER": os.environ.get("HPC_TEST_PG_USER", "postgres"),
        "NAME": _name or "hpc_job_controller",
        "TEST": {"NAME": _name or "test_hpc_job_controller"},
    }}
elif _backend == "mysql":
    # MariaDB (or MySQL) through mysqlclient; the server must allow this user
    # to create the test database.
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.mysql",
        "HOST": os.environ.get("HPC_TEST_MYSQL_HOST", "127.0.0.1"),
        "PORT": os.environ.get("HPC_TEST_MYSQL_PORT", "3306"),
        "USER": os.environ.get("HPC_TEST_MYSQL_USER", "root"),
        "PASSWORD": os.environ.get("HPC_TEST_MYSQL_PASSWORD", ""),
        "NAME": _name or "hpc_job_controller",
        "OPTIONS": {"charset": "utf8mb4"},
        "TEST": {"NAME": _name or "test_hpc_job_controller", "CHARSET": "utf8mb4",
                 "COLLATION": "utf8mb4_unicode_ci"},
    }}
else:
    _path = _name or os.environ.get(
        "HPC_TEST_SQLITE", os.path.join(tempfile.gettempdir(), f"hpc-test-{os.getpid()}.sqlite3"))
    DATABASES = {"default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": _path,
        # A file, not memory: hpcd runs in another process and must see it.
        "TEST": {"NAME": _path},
        # Writers take the lock when a transaction begins: no "database is
        # locked" failures between Django and hpcd (DESIGN.md section 10).
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 30},
    }}

HPC_IPC_UNIX_SOCKET = os.environ.get(
    "HPC_IPC_UNIX_SOCKET", os.path.join(tempfile.gettempdir(), f"hpc-test-{os.getpid()}.sock"))
HPC_WEBSOCKET_PORT = int(os.environ.get("HPC_WEBSOCKET_PORT", "0"))
HPC_JOB_CLASS = os.environ.get("HPC_JOB_CLASS", "djangoapp.models.HpcJob")
HPC_AGENT_RESUME_GRACE_SECONDS = float(os.environ.get("HPC_AGENT_RESUME_GRACE_SECONDS", "2"))
HPC_DISPATCH_SCAN_SECONDS = float(os.environ.get("HPC_DISPATCH_SCAN_SECONDS", "5"))
HPC_IPC_TIMEOUT = 20.0
# Tests that start hpcd in special surroundings pass these through its environment.
for _name in ("HPC_WEBSOCKET_INTERFACE", "HPC_WEBSOCKET_ENDPOINT", "HPC_AGENT_PING_SECONDS",
              "HPC_AGENT_CONNECT_TIMEOUT", "HPC_WEBSOCKET_PUBLIC_URL", "HPC_METRICS_ENDPOINT",
              "HPC_METRICS_JOB_COUNT_SECONDS", "HPC_LOG_WARNINGS_PER_SECOND"):
    if _name in os.environ:
        globals()[_name] = os.environ[_name]
if "HPC_IPC_SOCKET_MODE" in os.environ:
    HPC_IPC_SOCKET_MODE = int(os.environ["HPC_IPC_SOCKET_MODE"], 0)
if "HPC_IPC_SOCKET_GROUP" in os.environ:
    HPC_IPC_SOCKET_GROUP = os.environ["HPC_IPC_SOCKET_GROUP"]
# Test-only Fernet key for the cluster credentials (djangoapp.crypto).
HPC_CREDENTIAL_KEYS = ["IE2SCdRIt7btCajHo6VUXWuVdSKiESEYkHqORPjDZSQ="]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
