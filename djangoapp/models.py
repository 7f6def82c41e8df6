"""The app's public API: clusters, jobs and connection tokens.

Django processes never talk to a cluster directly.  They write to the
database and ask hpcd (over its Unix socket, :mod:`djangoapp.ipc`) to act;
hpcd owns every connection to the clusters' agents and writes the jobs'
states back.
"""

import hashlib
import logging
import mimetypes
import random
import secrets
from datetime import timedelta

from django.db import models, transaction
from django.http import StreamingHttpResponse
from django.utils import timezone
from django.utils.module_loading import import_string

from djangoapp import ipc, protocol, transitions
from djangoapp.conf import hpc_settings
from djangoapp.crypto import EncryptedTextField
from djangoapp.transitions import JobStateError
from hpc_agent.status import ACTIVE, JobStatus

__all__ = ["HpcCluster", "HpcJob", "HpcJobStatusChange", "WebsocketToken", "JobStatus",
           "JobStateError", "get_job_model"]

log = logging.getLogger(__name__)


def get_job_model():
    """The job class named by ``HPC_JOB_CLASS`` (HpcJob or a subclass)."""
    return import_string(hpc_settings.HPC_JOB_CLASS)


class HpcClusterQuerySet(models.QuerySet):
    def online(self):
        """Clusters whose agent hpcd last saw connected."""
        return self.filter(online=True, enabled=True)


class HpcCluster(models.Model):
    """A cluster an agent runs on, launched and kept connected by hpcd."""

    host_name = models.CharField(
        max_length=255,
        help_text="The host hpcd logs in to over SSH to start the agent; "
                  "'localhost' starts it as a local process instead.")
    port = models.PositiveIntegerField(default=22, help_text="The SSH port.")
    username = models.CharField(max_length=255, blank=True,
                                help_text="The user hpcd logs in as over SSH.")
    key = EncryptedTextField(
        "private key", blank=True,
        help_text="An SSH private key (ed25519, ECDSA or RSA; OpenSSH or PEM format). "
                  "Stored encrypted; leave empty for password login.")
    password = EncryptedTextField(
        blank=True,
        help_text="The key's passphrase when a key is set, else the login password. "
                  "Stored encrypted.")
    host_key = models.TextField(
        "pinned host keys", blank=True,
        help_text="The cluster's SSH host keys, one per line as ssh-keyscan prints them. "
                  "hpcd connects only to a server presenting one of these; use the "
                  "'Fetch and pin host keys' action to fill it in.")
    client_path = models.CharField(
        "agent directory", max_length=4096,
        help_text="The agent directory on the cluster: it holds venv/ (a Python "
                  "environment with hpc-job-controller installed) and settings.py.")
    enabled = models.BooleanField(
        default=True, help_text="hpcd keeps an agent connected only for enabled clusters.")
    online = models.BooleanField(
        default=False, editable=False,
        help_text="Written by hpcd: an agent is connected now.")
    connected_since = models.DateTimeField(null=True, blank=True, editable=False)
    status_detail = models.TextField(
        "connection status", blank=True, editable=False,
        help_text="Written by hpcd: what happened on the last launch or connection.")

    objects = HpcClusterQuerySet.as_manager()

    class Meta:
        verbose_name = "HPC cluster"
        ordering = ["host_name", "id"]

    def __str__(self):
        return f"{self.host_name}:{self.client_path}"

    @property
    def is_local(self):
        """The agent runs as a local process of hpcd, not over SSH."""
        return self.host_name == "localhost"

    def is_connected(self):
        """The WebsocketToken of the live agent connection, or None.

        Cheap: one round trip to hpcd over its Unix socket.  None too when
        hpcd itself is not running, since then nothing is connected.
        """
        try:
            token_id = ipc.call(protocol.IsClusterOnline, cluster_id=self.pk)["token_id"]
        except ipc.HpcdUnavailable:
            return None
        if not token_id:
            return None
        return WebsocketToken.objects.filter(pk=token_id).first()

    def try_connect(self, force=False):
        """Ask hpcd to start this cluster's agent unless it is online.

        With ``force`` the agent is launched even if one is connected; the new
        one takes over from the old.  Returns at once; the connection comes
        within seconds (see :meth:`is_connected` and ``status_detail``).
        """
        ipc.call(protocol.TryConnect, cluster_id=self.pk, force=force)

    def fetch_remote_file_list(self, path="/", recursive=True, ui_id=None):
        """``[{"path", "is_dir", "size"}, ...]`` below ``path`` on the cluster.

        With ``ui_id`` the path is relative to that job's working directory;
        without, it must lie in a directory the agent's settings allow.
        """
        files = ipc.call(protocol.ListFiles, cluster_id=self.pk, job_id=ui_id, path=path,
                         recursive=recursive)["files"]
        return [{"path": p, "is_dir": d, "size": s} for p, d, s in files]

    def fetch_remote_file(self, path, ui_id=None, force_download=True):
        """A StreamingHttpResponse of a file on the cluster.

        With ``ui_id`` the path is relative to that job's working directory;
        without, it is an absolute path in a directory the agent's settings
        allow.  The bytes stream from the agent through hpcd with flow control
        end to end, so memory use does not grow with the file's size.
        """
        response, chunks = ipc.open_stream(protocol.FetchFile, cluster_id=self.pk,
                                           job_id=ui_id, path=path)
        name = response["name"]
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        http = StreamingHttpResponse(chunks, content_type=content_type)
        http["Content-Length"] = str(response["size"])
        if force_download:
            http["Content-Disposition"] = _attachment(name)
        return http

    def get_ssh_connection(self):
        """A connection to run commands on the cluster, held by hpcd.

        hpcd logs in over SSH (a local shell for ``localhost``) with the
        cluster's credentials and pinned host keys.  Use it in a ``with``
        block, or call ``close()``::

            with cluster.get_ssh_connection() as ssh:
                result = ssh.exec_command("squeue --me", timeout=30)
                result.exit_status, result.stdout, result.stderr
        """
        return ClusterShell(self)

    def fetch_host_keys(self):
        """The SSH host keys the cluster's server offers now, to check before
        pinning: ``[{"key_type", "fingerprint", "line"}, ...]``."""
        return ipc.call(protocol.ScanHostKeys, cluster_id=self.pk, timeout=90)["keys"]

    def pin_host_keys(self, keys):
        """Trust these host keys (from :meth:`fetch_host_keys`) from now on."""
        self.host_key = "\n".join(k["line"] for k in keys) + "\n"
        self.save(update_fields=["host_key"])


class CommandResult:
    """What a command run by :class:`ClusterShell` left behind."""

    def __init__(self, exit_status, stdout, stderr, signal=None):
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr
        self.signal = signal

    def __repr__(self):
        return f"<CommandResult exit_status={self.exit_status} signal={self.signal}>"


class ClusterShell:
    """Runs commands on a cluster through hpcd (see get_ssh_connection)."""

    def __init__(self, cluster):
        self.cluster = cluster
        self._shell_id = ipc.call(protocol.OpenShell, cluster_id=cluster.pk, timeout=120)[
            "shell_id"]

    def exec_command(self, command, stdin=b"", timeout=60):
        """Run ``command`` with a shell; returns a CommandResult (a non-zero
        exit status is a result, not an exception)."""
        if self._shell_id is None:
            raise protocol.NotFound("this connection is closed")
        if isinstance(stdin, str):
            stdin = stdin.encode()
        # The socket waits for the command plus a margin for hpcd's own work.
        answer = ipc.call(protocol.RunCommand, timeout=float(timeout) + 30,
                          shell_id=self._shell_id, command=command, stdin=stdin,
                          timeout_seconds=float(timeout))
        return CommandResult(answer["exit_status"], answer["stdout"], answer["stderr"],
                             answer["signal"])

    def close(self):
        if self._shell_id is not None:
            shell_id, self._shell_id = self._shell_id, None
            ipc.call(protocol.CloseShell, shell_id=shell_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _attachment(name):
    safe = name.replace("\\", "_").replace('"', "_")
    return f'attachment; filename="{safe}"'


class HpcJob(models.Model):
    """A batch job; subclass it and name the subclass in ``HPC_JOB_CLASS``.

    The public API is :meth:`submit`, :meth:`cancel`, :meth:`delete_job`,
    :meth:`fetch_remote_file_list`, :meth:`fetch_remote_file` and the
    overridable :meth:`choose_cluster`.  ``job_status`` is written only through
    :func:`djangoapp.transitions.apply`, which enforces the transition table.
    """

    cluster = models.ForeignKey(
        HpcCluster, null=True, blank=True, on_delete=models.PROTECT, related_name="jobs",
        help_text="Chosen at submission by choose_cluster().")
    job_status = models.IntegerField(
        "status", choices=JobStatus.choices(), default=JobStatus.DRAFT, db_index=True)
    job_details = models.TextField(
        "details", blank=True, default="", help_text="The latest detail of the job's state.")
    job_parameters = models.JSONField(
        "parameters", null=True, blank=True,
        help_text="What submit() was given; sent to the agent's scheduler as JSON.")
    remote_job_id = models.CharField(
        "scheduler job id", max_length=255, blank=True, default="",
        help_text="The cluster scheduler's id for the job.")
    job_pending_time = models.DateTimeField(null=True, blank=True)
    job_submitting_time = models.DateTimeField(null=True, blank=True)
    job_submitted_time = models.DateTimeField(null=True, blank=True)
    job_queued_time = models.DateTimeField(null=True, blank=True)
    job_running_time = models.DateTimeField(null=True, blank=True)
    job_finished_time = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "HPC job"
        ordering = ["-id"]
        indexes = [models.Index(fields=["cluster", "job_status"])]

    def __str__(self):
        return f"job {self.pk} ({self.status.name})"

    @property
    def status(self):
        return JobStatus(self.job_status)

    def history(self):
        """This job's state changes, oldest first."""
        return self.status_changes.order_by("time", "id")

    def on_status_change(self, old, new, detail):
        """Called by hpcd after a state the cluster reported is stored.

        Override to react, e.g. to tell the job's owner it finished.  It runs
        in hpcd, on its database thread, once per applied change (``old`` and
        ``new`` are JobStatus values); an exception is logged and ignored.
        """

    def choose_cluster(self, parameters):
        """The cluster to run on; override to choose by the parameters.

        The default picks a random online cluster, or None when none is
        online, in which case hpcd asks again when a cluster connects.
        """
        clusters = list(HpcCluster.objects.online())
        return random.choice(clusters) if clusters else None

    def submit(self, parameters):
        """Submit the job with ``parameters`` (a JSON-serialisable object).

        The job becomes PENDING and hpcd dispatches it at once if its cluster
        is online, or when it comes online: submit never fails because hpcd or
        the cluster is down.  Returns the job's status.
        """
        if self.pk is None:
            self.save()
        with transaction.atomic():
            current = type(self).objects.select_for_update().get(pk=self.pk)
            if current.job_status != JobStatus.DRAFT:
                raise JobStateError(f"job {self.pk} is {current.status.name}; only a DRAFT job "
                                    "can be submitted (create a new job to run again)")
            self.job_parameters = parameters
            self.cluster = self.choose_cluster(parameters)
            self.save(update_fields=["job_parameters", "cluster"])
            transitions.apply(self.pk, JobStatus.PENDING, "django")
            transaction.on_commit(self._notify_hpcd)
        self.refresh_from_db()
        return self.status

    def cancel(self):
        """Stop the job.  A job never sent to a cluster is CANCELLED at once; a
        sent one becomes CANCELLING until the cluster confirms.  Cancelling a
        cancelled job does nothing; a finished job cannot be cancelled."""
        def decide(old):
            if old in (JobStatus.DRAFT, JobStatus.PENDING):
                return JobStatus.CANCELLED
            if old in ACTIVE:
                return JobStatus.CANCELLING
            return None

        applied, old = transitions.apply(self.pk, None, "django", decide=decide)
        self.refresh_from_db()
        if applied and self.status == JobStatus.CANCELLING:
            transaction.on_commit(self._notify_hpcd)
        elif not applied and old not in (JobStatus.CANCELLING, JobStatus.CANCELLED):
            raise JobStateError(f"job {self.pk} is {old.name if old is not None else 'gone'} "
                                "and cannot be cancelled")
        return self.status

    def delete_job(self):
        """Remove the job's data on the cluster.  The job must have finished;
        it becomes DELETING until the cluster confirms, then DELETED."""
        def decide(old):
            if old == JobStatus.DRAFT:
                return JobStatus.DELETED
            return JobStatus.DELETING

        applied, old = transitions.apply(self.pk, None, "django", decide=decide)
        self.refresh_from_db()
        if applied and self.status == JobStatus.DELETING:
            transaction.on_commit(self._notify_hpcd)
        elif not applied and old not in (JobStatus.DELETING, JobStatus.DELETED):
            raise JobStateError(f"job {self.pk} is {old.name if old is not None else 'gone'}: "
                                "only a finished job can be deleted (cancel it first)")
        return self.status

    def _notify_hpcd(self):
        # hpcd also scans for work periodically; this only saves the wait.
        try:
            ipc.call(protocol.Dispatch, job_id=self.pk)
        except protocol.HpcdError as e:
            log.info("job %s will be dispatched when hpcd next scans: %s", self.pk, e)

    def _require_cluster(self):
        if self.cluster_id is None:
            raise JobStateError(f"job {self.pk} has no cluster yet")
        return self.cluster

    def fetch_remote_file_list(self, path="/", recursive=True):
        """The job's files below ``path`` (relative to its working directory):
        ``[{"path", "is_dir", "size"}, ...]``."""
        return self._require_cluster().fetch_remote_file_list(path, recursive, ui_id=self.pk)

    def fetch_remote_file(self, path, force_download=True):
        """A StreamingHttpResponse of one of the job's files (a path relative
        to its working directory)."""
        return self._require_cluster().fetch_remote_file(path, ui_id=self.pk,
                                                         force_download=force_download)


class HpcJobStatusChange(models.Model):
    """One applied change of a job's state."""

    SOURCES = [("django", "Django"), ("hpcd", "hpcd"), ("agent", "Agent")]

    job = models.ForeignKey(HpcJob, on_delete=models.CASCADE, related_name="status_changes")
    time = models.DateTimeField(default=timezone.now)
    old_status = models.IntegerField(choices=JobStatus.choices())
    new_status = models.IntegerField(choices=JobStatus.choices())
    source = models.CharField(max_length=16, choices=SOURCES)
    detail = models.TextField(blank=True, default="")

    class Meta:
        verbose_name = "job status change"
        ordering = ["job", "time", "id"]

    def __str__(self):
        return (f"job {self.job_id}: {JobStatus(self.old_status).name} -> "
                f"{JobStatus(self.new_status).name}")


def hash_token(token):
    """Tokens are stored as their SHA-256: a database leak gives no credential."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class WebsocketTokenQuerySet(models.QuerySet):
    def issue(self, cluster_id, purpose, ttl=None):
        """Create a token; returns ``(row, secret)``.  Only the hash is stored."""
        secret = secrets.token_urlsafe(32)
        expires = timezone.now() + timedelta(seconds=ttl) if ttl else None
        row = self.create(cluster_id=cluster_id, purpose=purpose, expires=expires,
                          token_hash=hash_token(secret))
        return row, secret

    def usable(self, secret, purposes):
        """The token with this secret if it is of one of ``purposes``,
        unused and unexpired; else None.  Spends nothing."""
        return self.filter(token_hash=hash_token(secret), purpose__in=purposes,
                           used_at__isnull=True).filter(
            models.Q(expires__isnull=True) | models.Q(expires__gt=timezone.now())).first()

    def claim(self, secret, purposes):
        """Spend a token: the row if it was valid, unused and unexpired, else None.

        The compare-and-set on ``used_at`` makes it single-use even when two
        connections present it at once.
        """
        row = self.usable(secret, purposes)
        now = timezone.now()
        if row is None or not self.filter(pk=row.pk, used_at__isnull=True).update(used_at=now):
            return None
        row.used_at = now
        return row


class WebsocketToken(models.Model):
    """A single-use credential an agent presents to hpcd.

    ``agent`` tokens are handed to a launched agent; ``resume`` tokens let a
    connected agent come back after a drop; ``file`` tokens open one file
    transfer.  Every kind expires or is spent on first use.
    """

    PURPOSES = [("agent", "agent launch"), ("resume", "agent resume"), ("file", "file transfer")]

    cluster = models.ForeignKey(HpcCluster, on_delete=models.CASCADE, related_name="tokens")
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    purpose = models.CharField(max_length=16, choices=PURPOSES)
    created = models.DateTimeField(auto_now_add=True)
    expires = models.DateTimeField(null=True, blank=True)
    used_at = models.DateTimeField(null=True, blank=True)

    objects = WebsocketTokenQuerySet.as_manager()

    class Meta:
        verbose_name = "websocket token"
        ordering = ["-created"]
        indexes = [models.Index(fields=["cluster", "purpose", "used_at"])]

    def __str__(self):
        return f"{self.purpose} token {self.pk} of cluster {self.cluster_id}"

    def send_message(self, message):
        """Send a wire message (a dict with a ``type``, see hpc_agent.wire) over
        the live connection this token opened."""
        ipc.call(protocol.SendMessage, token_id=self.pk, message=message)
