"""The app's settings, read lazily from Django's settings with these defaults.

``from djangoapp.conf import hpc_settings`` then ``hpc_settings.HPC_...``:
each read consults ``django.conf.settings`` first, so tests can override
any of them with ``override_settings``.
"""

from django.conf import settings

DEFAULTS = {
    # TCP port hpcd listens on for agents' websockets.
    "HPC_WEBSOCKET_PORT": 8001,
    # Interface that port is bound to.  Agents on other hosts need a public
    # one (and TLS: see HPC_WEBSOCKET_ENDPOINT).
    "HPC_WEBSOCKET_INTERFACE": "127.0.0.1",
    # A full Twisted endpoint string for the websocket listener, overriding the
    # two above, e.g. "ssl:8001:privateKey=key.pem:certKey=cert.pem" or
    # "systemd:domain=INET:index=0".  None: tcp on HPC_WEBSOCKET_INTERFACE.
    "HPC_WEBSOCKET_ENDPOINT": None,
    # The URL agents are told to connect to (ws:// or wss://, no path).
    # None: ws://<interface>:<port actually bound>.
    "HPC_WEBSOCKET_PUBLIC_URL": None,
    # The Unix socket Django uses to talk to hpcd (created owner-only).
    "HPC_IPC_UNIX_SOCKET": "/tmp/job_controller.sock",
    # Seconds a Django process waits for hpcd's answer before giving up.
    "HPC_IPC_TIMEOUT": 30.0,
    # Bytes per read when streaming a file to a Django response.
    "HPC_FILE_CONNECTION_CHUNK_SIZE": 1024 * 1024,
    # Dotted path of the job model hpcd loads and updates (HpcJob or a subclass).
    "HPC_JOB_CLASS": "djangoapp.models.HpcJob",
    # Seconds a single-use launch or file token stays valid.
    "HPC_TOKEN_TTL_SECONDS": 60,
    # Threads hpcd uses for database work.
    "HPC_DB_THREADS": 4,
    # Seconds between hpcd's scans for jobs that need dispatching; a missed
    # notification from Django costs at most this long.
    "HPC_DISPATCH_SCAN_SECONDS": 30.0,
    # Seconds hpcd waits, after it starts or loses an agent, for the agent to
    # come back by itself before it launches a new one.
    "HPC_AGENT_RESUME_GRACE_SECONDS": 15.0,
    # Seconds hpcd waits for a launched agent to connect before retrying.
    "HPC_AGENT_CONNECT_TIMEOUT": 60.0,
    # Seconds between websocket pings to each agent; one unanswered for three
    # intervals drops the connection (and the cluster goes offline).
    "HPC_AGENT_PING_SECONDS": 10.0,
    # Seconds hpcd waits for an agent's answer to a request.
    "HPC_AGENT_REQUEST_TIMEOUT": 60.0,
    # Longest pause between two failed launches of a cluster's agent.
    "HPC_LAUNCH_MAX_BACKOFF_SECONDS": 600.0,
    # Fernet keys encrypting cluster credentials at rest (djangoapp.crypto); the
    # first encrypts, all decrypt; make one with `manage.py hpc_credentials newkey`.
    "HPC_CREDENTIAL_KEYS": [],
    # Most SSH logins per minute to one cluster (launches and commands):
    # sites ban hosts that log in too often.
    "HPC_SSH_LOGINS_PER_MINUTE": 6,
    # Seconds an SSH connection opened by get_ssh_connection() may stay idle.
    "HPC_SSH_SESSION_IDLE_SECONDS": 600,
    # -- operations (metrics, health, logs) --
    # A Twisted endpoint string where hpcd serves Prometheus metrics at
    # /metrics and a health check at /healthz, e.g. "tcp:9464:interface=127.0.0.1"
    # (needs the `metrics` extra: pip install 'hpc-job-controller[metrics]').
    # None: no HTTP listener at all.
    "HPC_METRICS_ENDPOINT": None,
    # Seconds between two counts of jobs by state for /metrics (one query
    # on hpcd's database threads; scrapes read the latest count).
    "HPC_METRICS_JOB_COUNT_SECONDS": 15.0,
    # Most log lines per second for one kind of warning (the same message
    # format); the rest are counted and reported as one line.  0: no limit.
    "HPC_LOG_WARNINGS_PER_SECOND": 5,
}


class _Settings:
    def __getattr__(self, name):
        if name not in DEFAULTS:
            raise AttributeError(f"unknown hpc-job-controller setting {name!r}")
        return getattr(settings, name, DEFAULTS[name])


hpc_settings = _Settings()
