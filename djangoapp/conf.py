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
    # Seconds an agent's websocket opening handshake may take, from TCP
    # connect to the upgrade (the agent's HPC_HANDSHAKE_TIMEOUT_SECONDS should
    # match it).
    "HPC_HANDSHAKE_TIMEOUT_SECONDS": 15.0,
    # Most websocket connections that have not yet proven a token, in all and
    # from one address; more are refused at once (agents need one control
    # connection and one per file being fetched).
    "HPC_PREAUTH_MAX_CONNECTIONS": 512,
    "HPC_PREAUTH_MAX_PER_ADDRESS": 64,
    # The Unix socket Django uses to talk to hpcd.  Its directory must be
    # writable by hpcd's user only.  None: <BASE_DIR>/run/hpcd.sock when the
    # Django settings define BASE_DIR (hpcd creates run/), else
    # /run/hpcd/hpcd.sock (RuntimeDirectory=hpcd under systemd).
    "HPC_IPC_UNIX_SOCKET": None,
    # Permissions of that socket, and a group to give it (a name), so that a
    # web server running as another user can be let in on purpose: e.g. mode
    # 0o660 and the web server's group.  Default: hpcd's user only.
    "HPC_IPC_SOCKET_MODE": 0o600,
    "HPC_IPC_SOCKET_GROUP": None,
    # Seconds a Django process waits for hpcd's answer before giving up.
    "HPC_IPC_TIMEOUT": 30.0,
    # Bytes per read when streaming a file to a Django response.
    "HPC_FILE_CONNECTION_CHUNK_SIZE": 1024 * 1024,
    # A file streamed to Django more slowly than this (bytes per second of
    # waiting for it, over 10 s) is aborted, so a stalled transfer cannot hold
    # a web worker.
    "HPC_FILE_MIN_BYTES_PER_SECOND": 8192,
    # Dotted path of the job model hpcd loads and updates (HpcJob or a subclass).
    "HPC_JOB_CLASS": "djangoapp.models.HpcJob",
    # Seconds a single-use launch or file token stays valid.
    "HPC_TOKEN_TTL_SECONDS": 60,
    # Threads hpcd uses for database work.
    "HPC_DB_THREADS": 4,
    # Seconds between hpcd's scans for jobs that need dispatching (a missed
    # notification from Django costs at most this long) and for clusters
    # added, enabled or disabled in the database.
    "HPC_DISPATCH_SCAN_SECONDS": 30.0,
    # A job hpcd owes a message to (PENDING, SUBMITTING, CANCELLING,
    # DELETING) that has not moved for this many seconds is named in hpcd's
    # log, with what it waits for, and again each further period.
    "HPC_STUCK_JOB_SECONDS": 600.0,
    # Seconds hpcd waits, after it starts or loses an agent, for the agent to
    # come back by itself before it launches a new one.
    "HPC_AGENT_RESUME_GRACE_SECONDS": 15.0,
    # Seconds an agent may take to come back with its resume token after its
    # connection was lost (or hpcd stopped); later, only a new launch brings
    # it back.  Longer than the agent's HPC_RECONNECT_SECONDS (600).
    "HPC_AGENT_RESUME_TOKEN_TTL_SECONDS": 3600.0,
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
    # first encrypts, all decrypt; make one with
    # `manage.py hpc_rotate_credentials --generate-key`.
    "HPC_CREDENTIAL_KEYS": [],
    # Most SSH logins per minute to one cluster (launches and commands):
    # sites ban hosts that log in too often.
    "HPC_SSH_LOGINS_PER_MINUTE": 6,
    # Seconds an SSH connection opened by get_ssh_connection() may stay idle.
    "HPC_SSH_SESSION_IDLE_SECONDS": 600,
    # -- seed compatibility and throughput (issues 7, 8, 12) --
    # Seconds submit(), cancel() and friends wait for hpcd to take their
    # notification; a stopped or hung hpcd costs at most this (its periodic
    # scan picks the job up instead).
    "HPC_IPC_NOTIFY_TIMEOUT": 0.5,
    # Most choose_cluster() calls one dispatch scan makes for jobs without a
    # cluster; the rest wait for the next scans, in turn.
    "HPC_DISPATCH_ASSIGN_LIMIT": 100,
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
    # -- files over HTTP: ranges, checksums, uploads (issue 10) --
    # Seconds hpcd waits for an agent to compute a file's SHA-256
    # (file_checksum reads the whole file; HPC_AGENT_REQUEST_TIMEOUT is too
    # short for a large one).
    "HPC_FILE_CHECKSUM_TIMEOUT": 3600.0,
    # Largest file upload_file() accepts, in bytes (Django, hpcd and the agent
    # each stop a larger one).  None: no limit.
    "HPC_UPLOAD_MAX_BYTES": 10 * 1024 ** 3,
    # -- sizes (issue 9) --
    # Largest job parameters submit() accepts, in bytes of their JSON (they
    # travel to the agent in one control frame, 16 MiB at most).
    "HPC_MAX_PARAMETERS_BYTES": 1024 * 1024,
    # Longest detail of a job's state that hpcd stores from an agent's update
    # (in the job and its history); longer ones are cut, with a marker.
    "HPC_JOB_DETAIL_MAX_CHARS": 4000,
}


class _Settings:
    def __getattr__(self, name):
        if name not in DEFAULTS:
            raise AttributeError(f"unknown hpc-job-controller setting {name!r}")
        return getattr(settings, name, DEFAULTS[name])


hpc_settings = _Settings()
