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
import uuid
from datetime import timedelta

from django.apps import apps
from django.db import models, router, transaction
from django.db.models.signals import pre_delete
from django.http import StreamingHttpResponse
from django.utils import timezone
from django.utils.http import content_disposition_header, http_date
from django.utils.module_loading import import_string

from djangoapp import crypto, ipc, protocol, submission, transitions
from djangoapp.conf import hpc_settings
from djangoapp.crypto import EncryptedTextField
from djangoapp.files import FileList
from djangoapp.protocol import JobStillRunning, ParametersRefused
from djangoapp.shell import ClusterShell, CommandResult
from djangoapp.transitions import JobStateError, model_receivers
from hpc_agent.status import ACTIVE, JobStatus

__all__ = ["HpcCluster", "HpcJob", "HpcJobManager", "HpcJobStatusChange", "WebsocketToken",
           "HpcInstallation", "JobStillRunning", "ParametersRefused",
           "JobStatus", "JobStateError", "FileList", "CommandResult", "get_job_model",
           "display_name"]

log = logging.getLogger(__name__)


def get_job_model():
    """The job class named by ``HPC_JOB_CLASS`` (HpcJob or a subclass).

    Either a dotted import path (``"jobs.models.Job"``) or the short form
    ``"app_label.ModelName"``, as ``AUTH_USER_MODEL`` is written.
    """
    name = hpc_settings.HPC_JOB_CLASS
    if name.count(".") == 1:
        try:
            return apps.get_model(name, require_ready=False)
        except (LookupError, ValueError):
            pass  # a module.Class path after all
    return import_string(name)


def _require_job_class(cls):
    """hpcd loads jobs through HPC_JOB_CLASS only: a job of another class
    would never get a cluster from its own choose_cluster nor its hooks."""
    job_model = get_job_model()
    if not issubclass(cls, job_model):
        raise TypeError(
            f"a {cls.__name__} job cannot be submitted while HPC_JOB_CLASS is "
            f"{job_model.__module__}.{job_model.__name__}: hpcd would never dispatch it. "
            "Create jobs with djangoapp.models.get_job_model().")


def display_name(status):
    """The seed's display name of a state number; "Unknown" for any other value."""
    return JobStatus.display_name(status)


def _status_name(status):
    return JobStatus(status).name if status is not None else "gone"


def _notify_hpcd(job_id, status=None, cluster_id=None):
    """Tell hpcd to act on a job now (0: scan for every job that needs it);
    ``status`` and ``cluster_id`` are what was just stored, so that hpcd
    need not look a PENDING job up.

    Fire and forget (protocol.Notify is written, not answered), with a short
    timeout: hpcd also scans periodically, so a stopped or hung hpcd only
    delays the job and never blocks the caller for more than
    HPC_IPC_NOTIFY_TIMEOUT.
    """
    hints = {k: v for k, v in (("status", status), ("cluster_id", cluster_id)) if v is not None}
    try:
        ipc.tell(protocol.Notify, timeout=float(hpc_settings.HPC_IPC_NOTIFY_TIMEOUT),
                 job_id=job_id, **hints)
    except protocol.HpcdError as e:
        what = f"job {job_id}" if job_id else "the submitted jobs"
        log.info("%s will be dispatched when hpcd next scans: %s", what, e)


#: cluster id -> (hpcd's sessions stamp, its IsClusterOnline answer), in this
#: process; an answer is used while the stamp reads the same (is_connected()).
_online_answers = {}


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
        permissions = [("pin_host_keys", "Can fetch and pin a cluster's SSH host keys")]

    def __str__(self):
        return f"{self.host_name}:{self.client_path}"

    @property
    def is_local(self):
        """The agent runs as a local process of hpcd, not over SSH."""
        return self.host_name == "localhost"

    def is_connected(self):
        """The WebsocketToken of the live agent connection, or None.

        Cheap: no database query (hpcd answers the token's fields from
        memory; only its ``token_hash`` is left to load on access), and a
        round trip to hpcd only when a session came or went since this
        process last asked about the cluster (hpcd's sessions stamp,
        :mod:`hpcd.stamp`).  None too when hpcd itself is not running, since
        then nothing is connected.
        """
        stamp = ipc.sessions_stamp()
        kept = _online_answers.get(self.pk) if stamp is not None else None
        if kept is not None and kept[0] == stamp:
            answer = kept[1]
        else:
            try:
                answer = ipc.call(protocol.IsClusterOnline, cluster_id=self.pk)
            except ipc.HpcdUnavailable:
                return None
            if stamp is not None:
                # The stamp read before asking: a change meanwhile moved it on.
                _online_answers[self.pk] = (stamp, answer)
        if not answer["token_id"]:
            return None
        if answer.get("token_purpose") is None:
            # An hpcd from before IsClusterOnline carried the token's fields.
            return WebsocketToken.objects.filter(pk=answer["token_id"]).first()
        values = {"id": answer["token_id"], "cluster_id": self.pk,
                  "purpose": answer["token_purpose"], "created": answer.get("token_created"),
                  "expires": answer.get("token_expires"), "used_at": answer.get("token_used_at")}
        fields = [f.attname for f in WebsocketToken._meta.concrete_fields if f.attname in values]
        token = WebsocketToken.from_db(router.db_for_read(WebsocketToken), fields,
                                       [values[name] for name in fields])
        token.cluster = self
        return token

    def try_connect(self, force=False):
        """Ask hpcd to start this cluster's agent unless it is online.

        With ``force`` the agent is launched even if one is connected; the new
        one takes over from the old.  Returns at once; the connection comes
        within seconds (see :meth:`is_connected` and ``status_detail``).
        """
        ipc.call(protocol.TryConnect, cluster_id=self.pk, force=force)

    def fetch_remote_file_list(self, path="/", recursive=True, ui_id=None, with_mtime=False):
        """``[{"path", "is_dir", "size"}, ...]`` below ``path`` on the cluster.

        With ``ui_id`` the path is relative to that job's working directory;
        without, it must lie in a directory the agent's settings allow.
        The result is a :class:`FileList`: a list of those dicts that can
        also be read the way the seed's GET_FILE_TREE message was.
        ``with_mtime``: each dict also has ``"mtime"`` (seconds since the epoch).
        """
        arguments = {"with_mtime": True} if with_mtime else {}
        files = ipc.call(protocol.ListFiles, cluster_id=self.pk, job_id=ui_id, path=path,
                         recursive=recursive, **arguments)["files"]
        keys = ("path", "is_dir", "size", "mtime")
        return FileList(dict(zip(keys, entry)) for entry in files)

    def fetch_remote_file(self, path, ui_id=None, force_download=True, extra_params=None,
                          offset=0, length=None):
        """A StreamingHttpResponse of a file on the cluster.

        With ``ui_id`` the path is relative to that job's working directory
        (a leading ``/`` is ignored, as in the seed); without, it is an
        absolute path in a directory the agent's settings allow.  The bytes
        stream from the agent through hpcd with flow control end to end, so
        memory use does not grow with the file's size.  ``extra_params`` (any
        JSON value) is handed to the agent's scheduler's ``file_send_start``
        and ``file_send_end``, e.g. to build an archive on the fly.

        ``offset`` and ``length`` (None: to the end) ask for part of the file:
        the agent seeks, and nothing before ``offset`` is sent.  The response
        is then a 206 with ``Content-Range``.  Every response carries
        ``Last-Modified``, an ``ETag`` made of size and mtime, and
        ``Accept-Ranges``; ``response.file_info`` holds ``name``, ``size``
        (of the bytes sent), ``total_size``, ``mtime`` and ``offset``.
        """
        arguments = {"cluster_id": self.pk, "job_id": ui_id, "path": path}
        if extra_params is not None:
            arguments["extra_params"] = extra_params
        if offset:
            arguments["offset"] = int(offset)
        if length is not None:
            arguments["length"] = int(length)
        response, chunks = ipc.open_stream(protocol.FetchFile, **arguments)
        name = response["name"]
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        http = StreamingHttpResponse(chunks, content_type=content_type)
        http["Content-Length"] = str(response["size"])
        if force_download:
            http["Content-Disposition"] = _attachment(name)
        info = {"name": name, "size": response["size"], "offset": int(offset or 0),
                "total_size": response.get("total_size"), "mtime": response.get("mtime")}
        http.file_info = info
        http["Accept-Ranges"] = "bytes"
        if info["mtime"] is not None and info["total_size"] is not None:
            http["Last-Modified"] = http_date(info["mtime"])
            http["ETag"] = file_etag(info["total_size"], info["mtime"])
        if (offset or length is not None) and info["total_size"] is not None:
            http.status_code = 206
            if info["size"]:
                last = info["offset"] + info["size"] - 1
                http["Content-Range"] = f"bytes {info['offset']}-{last}/{info['total_size']}"
        return http

    def file_checksum(self, path, ui_id=None):
        """``{"sha256", "size", "mtime"}`` of a file, computed by the agent
        reading it on the cluster (nothing is transferred).  Paths as for
        :meth:`fetch_remote_file`.  Waits up to HPC_FILE_CHECKSUM_TIMEOUT."""
        timeout = float(hpc_settings.HPC_FILE_CHECKSUM_TIMEOUT)
        return ipc.call(protocol.FileChecksum, timeout=timeout + 5, cluster_id=self.pk,
                        job_id=ui_id, path=path)

    def get_ssh_connection(self):
        """A connection to run commands on the cluster, held by hpcd.

        hpcd logs in over SSH (a local shell for ``localhost``) with the
        cluster's credentials and pinned host keys.  Use it in a ``with``
        block, or call ``close()``::

            with cluster.get_ssh_connection() as ssh:
                result = ssh.exec_command("squeue --me", timeout=30)
                result.exit_status, result.stdout, result.stderr

        The seed handed out a paramiko connection; its idiom works too::

            stdin, stdout, stderr = ssh.exec_command("squeue --me")
            stdout.read(), stdout.channel.recv_exit_status()
        """
        return ClusterShell(self)

    def credentials(self):
        """The decrypted ``{"key", "password"}``.

        Only hpcd's launcher and the key rotation command need them: loading
        or listing clusters never decrypts, so a changed HPC_CREDENTIAL_KEYS
        breaks only the logins it must.  Raises CredentialKeyError, whose
        message names what to fix, when a value cannot be decrypted.
        """
        return {"key": crypto.reveal(self.key), "password": crypto.reveal(self.password)}

    def fetch_host_keys(self):
        """The SSH host keys the cluster's server offers now, to check before
        pinning: ``[{"key_type", "fingerprint", "line"}, ...]``."""
        return ipc.call(protocol.ScanHostKeys, cluster_id=self.pk, timeout=90)["keys"]

    def pin_host_keys(self, keys):
        """Trust these host keys (from :meth:`fetch_host_keys`) from now on."""
        self.host_key = "\n".join(k["line"] for k in keys) + "\n"
        self.save(update_fields=["host_key"])


def _attachment(name):
    # RFC 6266: filename*= for names that plain ASCII cannot carry.
    return content_disposition_header(True, name)


def file_etag(size, mtime):
    """A strong ETag from a file's size and mtime (to the microsecond): it
    changes whenever the file does, as far as the file system can tell."""
    return f'"{int(size):x}-{int(round(float(mtime) * 1e6)):x}"'


class HpcJobQuerySet(models.QuerySet):
    def delete(self):
        """Delete the rows; refused with JobStillRunning, and nothing
        deleted, when one of the jobs may run on its cluster.  Checked
        before the deletion's transaction starts, so a refusal leaves the
        caller's transaction usable."""
        running = list(self.filter(job_status__in=[int(s) for s in ON_CLUSTER]).order_by()
                       .values_list("pk", "job_status", "cluster_id")[:11])
        if running:
            pk, status, cluster_id = running[0]
            more = (f" (and {len(running) - 1}{'+' if len(running) > 10 else ''} more "
                    "such jobs)" if len(running) > 1 else "")
            try:
                _refuse_if_on_cluster(pk, status, cluster_id)
            except JobStillRunning as e:
                raise JobStillRunning(str(e) + more, [r[0] for r in running]) from None
        return super().delete()

    delete.alters_data = True
    delete.queryset_only = True


class HpcJobManager(models.Manager.from_queryset(HpcJobQuerySet)):
    """The manager of HpcJob and, inherited, of its subclasses.

    A job class that declares its own manager derives it from this one to
    keep :meth:`submit_many`.
    """

    def submit_many(self, jobs):
        """Submit many jobs in one transaction, with one notification to hpcd.

        ``jobs``: ``(job, parameters)`` pairs, each job a DRAFT of this
        manager's class, saved or not (unsaved ones are inserted already
        PENDING).  As :meth:`HpcJob.submit` does for one: a job keeps the
        cluster it has, or gets its ``choose_cluster(parameters)``.  All or
        nothing: a job that is not a DRAFT raises JobStateError, and
        parameters submit() would refuse raise ParametersRefused, and none is
        submitted.  Returns the jobs, PENDING.

        With ``pre_save``/``post_save`` receivers connected for the class,
        each job is saved through the model so that they see it (slower);
        otherwise rows are written in bulk, a few statements per 500 jobs.
        """
        model = self.model
        pairs = [(job, parameters) for job, parameters in jobs]
        for job, _ in pairs:
            if not isinstance(job, model):
                raise TypeError(f"submit_many() of {model.__name__} was given {job!r}")
        _require_job_class(model)
        limit = submission.parameters_limit()
        for job, parameters in pairs:
            submission.check_parameters(job.pk, parameters, limit)
        choose = submission.cluster_chooser(model)
        for job, parameters in pairs:
            if job.cluster_id is None:
                job.cluster = choose(job, parameters)
        with transaction.atomic(using=self.db):
            if model_receivers(model):
                for job, parameters in pairs:
                    job._submit_through_model(parameters)
            else:
                now = timezone.now()
                saved = [p for p in pairs if p[0].pk is not None]
                submission.insert_pending(model, [p for p in pairs if p[0].pk is None], now,
                                          self.db)
                submission.update_pending(saved, now)
                transitions.insert_history([
                    transitions.Change(job.pk, JobStatus.DRAFT, JobStatus.PENDING, "", "django")
                    for job, _ in pairs], now)
            if pairs:
                transaction.on_commit(lambda: _notify_hpcd(0), using=self.db)
        return [job for job, _ in pairs]


class HpcJob(models.Model):
    """A batch job; subclass it and name the subclass in ``HPC_JOB_CLASS``.

    The public API is :meth:`submit`, :meth:`cancel`, :meth:`delete_job`,
    :meth:`fetch_remote_file_list`, :meth:`fetch_remote_file`,
    ``objects.submit_many`` and the overridable :meth:`choose_cluster` and
    :meth:`on_status_change`.  ``job_status`` is written only through
    :mod:`djangoapp.transitions`, which enforces the transition table.

    Subclasses may define ``status``, ``name``, ``description``, ``user``
    or the like as they please: this class's own code reads only its
    ``job_*`` fields.
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

    objects = HpcJobManager()

    class Meta:
        verbose_name = "HPC job"
        ordering = ["-id"]
        indexes = [models.Index(fields=["cluster", "job_status"])]
        permissions = [("cancel_hpcjob", "Can cancel HPC jobs")]

    def __str__(self):
        return f"job {self.pk} ({_status_name(self.job_status)})"

    @property
    def status(self):
        """The state as a JobStatus (a subclass may redefine ``status``; this
        class never reads it)."""
        return JobStatus(self.job_status)

    @property
    def job_status_display(self):
        """The state in the seed's words ("Wall Time Exceeded")."""
        return display_name(self.job_status)

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
        the cluster is down, nor waits for it.  A job whose ``cluster`` is set
        stays on it; otherwise ``choose_cluster`` picks.  Only a DRAFT job can
        be submitted (JobStateError).  Parameters larger than
        HPC_MAX_PARAMETERS_BYTES, or that are not JSON, raise
        ParametersRefused and change nothing.  Returns the job's status.
        """
        _require_job_class(type(self))
        submission.check_parameters(self.pk, parameters, submission.parameters_limit())
        using = router.db_for_write(type(self), instance=self)
        # One transaction (one commit, the costly part on PostgreSQL), with
        # no savepoint inside a caller's: a refusal is raised after it, so a
        # caller's transaction that catches JobStateError goes on.
        with transaction.atomic(using=using, savepoint=False):
            if self.pk is None:
                self.save(using=using)
            if self.cluster_id is None:
                self.cluster = self.choose_cluster(parameters)
            applied, old = transitions.apply(
                self.pk, JobStatus.PENDING, "django", instance=self,
                extra={"job_parameters": parameters, "cluster_id": self.cluster_id})
            if applied:
                transaction.on_commit(self._notify_hpcd, using=using)
        if not applied:
            raise JobStateError(_not_a_draft(self.pk, old))
        return JobStatus.PENDING

    def _submit_through_model(self, parameters):
        """submit_many()'s way for a class with model receivers: each job
        saved through the model, in the caller's transaction."""
        if self.pk is None:
            self.save()
        applied, old = transitions.apply(
            self.pk, JobStatus.PENDING, "django", instance=self,
            extra={"job_parameters": parameters, "cluster_id": self.cluster_id})
        if not applied:
            raise JobStateError(_not_a_draft(self.pk, old))

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

        applied, old = transitions.apply(self.pk, None, "django", decide=decide, instance=self)
        if applied:
            if self.job_status == JobStatus.CANCELLING:
                transaction.on_commit(self._notify_hpcd)
            return JobStatus(self.job_status)
        if old in (JobStatus.CANCELLING, JobStatus.CANCELLED):
            return old
        raise JobStateError(f"job {self.pk} is {_status_name(old)} and cannot be cancelled")

    def delete_job(self):
        """Remove the job's data on the cluster.  The job must have finished;
        it becomes DELETING until the cluster confirms, then DELETED."""
        def decide(old):
            if old == JobStatus.DRAFT:
                return JobStatus.DELETED
            return JobStatus.DELETING

        applied, old = transitions.apply(self.pk, None, "django", decide=decide, instance=self)
        if applied:
            if self.job_status == JobStatus.DELETING:
                transaction.on_commit(self._notify_hpcd)
            return JobStatus(self.job_status)
        if old in (JobStatus.DELETING, JobStatus.DELETED):
            return old
        raise JobStateError(f"job {self.pk} is {_status_name(old)}: only a finished job can "
                            "be deleted (cancel it first)")

    def delete(self, *args, **kwargs):
        """Delete the row; refused with JobStillRunning while the job may run
        on its cluster (cancel it and delete the row once it has ended).  A
        DRAFT or PENDING job, which never reached a cluster, and a finished
        one may be deleted.  The state checked is the stored one."""
        if self.pk is not None:
            stored = HpcJob.objects.filter(pk=self.pk).values_list("job_status", flat=True)
            _refuse_if_on_cluster(self.pk, stored.first(), self.cluster_id)
        return super().delete(*args, **kwargs)

    def _notify_hpcd(self):
        _notify_hpcd(self.pk, self.job_status, self.cluster_id)

    def _require_cluster(self):
        if self.cluster_id is None:
            raise JobStateError(f"job {self.pk} has no cluster yet")
        return self.cluster

    def fetch_remote_file_list(self, path="/", recursive=True, with_mtime=False):
        """The job's files below ``path`` (relative to its working directory):
        a :class:`FileList` of ``{"path", "is_dir", "size"}`` (and ``"mtime"``
        with ``with_mtime``)."""
        return self._require_cluster().fetch_remote_file_list(path, recursive, ui_id=self.pk,
                                                              with_mtime=with_mtime)

    def fetch_remote_file(self, path, force_download=True, extra_params=None, offset=0,
                          length=None):
        """A StreamingHttpResponse of one of the job's files (a path relative
        to its working directory; a leading ``/`` is ignored).
        ``extra_params``, ``offset`` and ``length`` (a range: the agent
        seeks): see :meth:`HpcCluster.fetch_remote_file`."""
        return self._require_cluster().fetch_remote_file(
            path, ui_id=self.pk, force_download=force_download, extra_params=extra_params,
            offset=offset, length=length)

    def file_checksum(self, path):
        """``{"sha256", "size", "mtime"}`` of one of the job's files, computed
        by the agent on the cluster while reading it (nothing is transferred)."""
        return self._require_cluster().file_checksum(path, ui_id=self.pk)

    def upload_file(self, relative_path, fileobj):
        """Put ``fileobj`` (anything with ``read(n)``: an uploaded file, an
        open file) in the job's working directory as ``relative_path``.

        Streams with flow control end to end; missing directories are made
        inside the working directory, which the agent creates if the job has
        not run yet (so input files can go in before :meth:`submit`, once the
        job's ``cluster`` is set).  The same confinement as reads: no path
        outside the directory, not even through a symlink, and only a regular
        file is ever replaced.  The file appears under its name only when
        complete and its SHA-256 matches: an upload cut off halfway leaves
        whatever was there before.  At most HPC_UPLOAD_MAX_BYTES
        (``TooLarge``).  Returns ``{"size", "sha256", "mtime"}``.

        A scheduler written for the seed empties the working directory when
        it submits: with one, upload after submission.
        """
        cluster = self._require_cluster()
        if self.job_status in (JobStatus.DELETING, JobStatus.DELETED):
            raise JobStateError(f"job {self.pk} is {_status_name(self.job_status)}: its "
                                "directory is gone, or going")
        limit = hpc_settings.HPC_UPLOAD_MAX_BYTES
        return ipc.send_stream(protocol.UploadFile, fileobj,
                               limit=None if limit is None else int(limit),
                               cluster_id=cluster.pk, job_id=self.pk, path=relative_path)

    def user_can_access_files(self, user, write=False):
        """Whether ``user`` may list and download this job's files through
        ``djangoapp.urls`` (and upload into its directory, with ``write``).

        Override for a portal's own rule, e.g. the job's owner::

            def user_can_access_files(self, user, write=False):
                return user.is_authenticated and self.owner_id == user.pk

        The default lets active staff users in, and no one else.
        """
        return bool(user.is_active and user.is_staff)


#: States in which a job may run on its cluster, or its data be removed
#: there: its row is not deleted then (JobStillRunning).
ON_CLUSTER = ACTIVE | {JobStatus.DELETING}


def _refuse_if_on_cluster(job_id, status, cluster_id):
    if status is not None and JobStatus(status) in ON_CLUSTER:
        raise JobStillRunning(
            f"job {job_id} is {JobStatus(status).name} on cluster {cluster_id}: deleting its "
            "row would leave it on the cluster with nobody to cancel it. Cancel it "
            "(job.cancel()) and delete the row once it has ended.", [job_id])


def _refuse_deleting_a_running_job(sender, instance, **kwargs):
    """The last line: every way a row goes (a cascade from a site's own
    model, a manager not derived from HpcJobManager) sends pre_delete for
    HpcJob, also for a subclass's row; raising here rolls the whole deletion
    back (and, Django's deletion using no savepoint, the caller's
    transaction with it: Model.delete and QuerySet.delete refuse before)."""
    _refuse_if_on_cluster(instance.pk, instance.job_status, instance.cluster_id)


pre_delete.connect(_refuse_deleting_a_running_job, sender=HpcJob,
                   dispatch_uid="djangoapp.refuse_deleting_a_running_job")


def _not_a_draft(job_id, old):
    if old is None:
        return f"job {job_id} does not exist (was it deleted?)"
    return (f"job {job_id} is {_status_name(old)}; only a DRAFT job can be submitted "
            "(create a new job to run again)")


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


class HpcInstallation(models.Model):
    """This installation's identity: one row, its UUID made once.

    hpcd sends it in every ``welcome``; an agent binds its state to the
    first one it sees and refuses any other, so two sites (or a database
    that was reset) sharing an agent directory cannot mix up their jobs,
    whose ids are only unique within one database.  The migration creates
    the row; :meth:`current` makes it if it is missing.
    """

    installation_id = models.UUIDField(
        "installation id", default=uuid.uuid4, unique=True, editable=False,
        help_text="Made once; agents refuse an installation whose id is not the one "
                  "they first served.")
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "installation"
        ordering = ["id"]

    def __str__(self):
        return f"installation {self.installation_id}"

    @classmethod
    def current(cls):
        """The installation's row, made on first use (the first writer wins
        a race: the row has a fixed primary key)."""
        row = cls.objects.order_by("id").first()
        if row is None:
            row, _ = cls.objects.get_or_create(pk=1)
        return row
