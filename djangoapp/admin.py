"""Admin pages.  Rows hpcd writes are read-only here; actions go through the
public API (cancel, delete, connect), never by editing state fields.

Stored credentials (the SSH private key, the password or key passphrase) are
never rendered, for any user: a user who may change a cluster gets empty
write-only fields to replace them, everyone sees only whether one is set.
Every action needs a permission: change for connecting, delete for deleting
a job's data, and the custom ``pin_host_keys`` and ``cancel_hpcjob``.
"""

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.shortcuts import render

from djangoapp import ipc, protocol
from djangoapp.conf import hpc_settings
from djangoapp.ipc import HpcdError
from djangoapp.models import (
    ON_CLUSTER,
    HpcCluster,
    HpcInstallation,
    HpcJob,
    HpcJobStatusChange,
    JobStatus,
    WebsocketToken,
    get_job_model,
)
from djangoapp.transitions import JobStateError


class HpcClusterForm(forms.ModelForm):
    """Credentials are write-only: the form never shows a stored value back.

    An empty key or password field keeps what is stored; "clear" removes it.
    """

    key = forms.CharField(
        required=False, strip=False, label="Private key",
        widget=forms.Textarea(attrs={"rows": 4, "autocomplete": "off",
                                     "placeholder": "(stored; paste a new key to replace it)"}),
        help_text=HpcCluster._meta.get_field("key").help_text)
    password = forms.CharField(
        required=False, strip=False, widget=forms.PasswordInput(render_value=False),
        help_text=HpcCluster._meta.get_field("password").help_text)
    clear_credentials = forms.BooleanField(
        required=False, help_text="Remove the stored key and password.")

    class Meta:
        model = HpcCluster
        fields = ["host_name", "port", "username", "key", "password", "clear_credentials",
                  "host_key", "client_path", "enabled"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial["key"] = ""
        self.initial["password"] = ""

    def clean(self):
        data = super().clean()
        for name in ("key", "password"):
            if self.instance.pk and not data.get(name) and not data.get("clear_credentials"):
                data[name] = getattr(self.instance, name)
            elif data.get("clear_credentials"):
                data[name] = ""
        return data


def live_connections():
    """``{cluster id: online}`` as hpcd knows it now, or None when hpcd does
    not answer within HPC_IPC_NOTIFY_TIMEOUT (stopped, hung, unreachable):
    the database's ``online`` is only what hpcd last wrote, and a killed
    hpcd cannot clear it.  One round trip per page."""
    try:
        status = ipc.call(protocol.Status, timeout=float(hpc_settings.HPC_IPC_NOTIFY_TIMEOUT))
    except HpcdError:
        return None
    return {row["id"]: row["online"] for row in status["status"]["clusters"]}


def connection_text(cluster, live):
    """A cluster's connection in words, from :func:`live_connections`."""
    if live is None:
        return "unknown (hpcd does not answer)"
    if not cluster.enabled:
        return "disabled"
    return "online" if live.get(cluster.pk) else "offline"


#: Form fields that carry credentials: offered only to users who may change
#: the cluster, and then write-only.
CREDENTIAL_FIELDS = ("key", "password", "clear_credentials")


@admin.register(HpcCluster)
class HpcClusterAdmin(admin.ModelAdmin):
    form = HpcClusterForm
    list_display = ("host_name", "client_path", "enabled", "online", "connected_since",
                    "status_detail")  # "online" is replaced by hpcd's live answer
    list_filter = ("enabled", "online")
    readonly_fields = ("credentials_stored", "connection", "connected_since", "status_detail")
    actions = ["connect_now", "pin_host_keys"]

    def get_fields(self, request, obj=None):
        # Without the right to change, Django renders every field read-only
        # with its stored value: the credential fields are left out instead.
        may_write = (self.has_change_permission(request, obj) if obj is not None
                     else self.has_add_permission(request))
        fields = [*HpcClusterForm.Meta.fields, *self.readonly_fields]
        if not may_write:
            fields = [f for f in fields if f not in CREDENTIAL_FIELDS]
        return fields

    def get_list_display(self, request):
        live = live_connections()

        @admin.display(description="connection")
        def connection(cluster):
            return connection_text(cluster, live)

        return [connection if name == "online" else name for name in self.list_display]

    @admin.display(description="connection")
    def connection(self, obj):
        if obj is None or obj.pk is None:
            return "-"
        return connection_text(obj, live_connections())

    @admin.display(description="stored credentials")
    def credentials_stored(self, obj):
        if obj is None or obj.pk is None:
            return "none"
        stored = [name for name, value in (("private key", obj.key), ("password", obj.password))
                  if value]
        return ", ".join(stored) + " (set)" if stored else "none"

    def has_pin_host_keys_permission(self, request):
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.pin_host_keys")

    @admin.action(description="Fetch and pin host keys (shows the fingerprints first)",
                  permissions=["pin_host_keys"])
    def pin_host_keys(self, request, queryset):
        if request.POST.get("confirm") == "yes":
            for cluster in queryset:
                lines = request.POST.getlist(f"key-{cluster.pk}")
                if lines:
                    cluster.pin_host_keys([{"line": line} for line in lines])
                    self.message_user(request, f"{cluster}: pinned {len(lines)} host keys")
            return None
        offered = []
        for cluster in queryset:
            try:
                offered.append((cluster, cluster.fetch_host_keys(), None))
            except HpcdError as e:
                offered.append((cluster, [], str(e)))
        return render(request, "admin/djangoapp/hpccluster/pin_host_keys.html", {
            **self.admin_site.each_context(request), "title": "Pin SSH host keys",
            "offered": offered, "queryset": queryset,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME, "opts": self.model._meta})

    @admin.action(description="Connect now (launch the agent if it is not online)",
                  permissions=["change"])
    def connect_now(self, request, queryset):
        for cluster in queryset:
            try:
                cluster.try_connect()
            except HpcdError as e:
                self.message_user(request, f"{cluster}: {e}", messages.ERROR)
            else:
                self.message_user(request, f"{cluster}: hpcd is connecting it")


class StatusChangeInline(admin.TabularInline):
    model = HpcJobStatusChange
    extra = 0
    can_delete = False
    readonly_fields = ("time", "old_status", "new_status", "source", "detail")

    def has_add_permission(self, request, obj=None):
        return False


#: Characters of a job's detail the job list shows.
LIST_DETAIL_CHARS = 120


@admin.register(HpcJob)
class HpcJobAdmin(admin.ModelAdmin):
    list_display = ("id", "cluster", "job_status", "short_details", "remote_job_id",
                    "job_submitted_time", "job_finished_time")
    list_filter = ("job_status", "cluster")
    readonly_fields = ("job_status", "job_details", "remote_job_id", "job_pending_time",
                       "job_submitting_time", "job_submitted_time", "job_queued_time",
                       "job_running_time", "job_finished_time")
    inlines = [StatusChangeInline]
    actions = ["cancel_jobs", "delete_job_data"]

    @admin.display(description="details", ordering="job_details")
    def short_details(self, job):
        # The list shows the start of a detail; the job's page shows it all.
        detail = job.job_details
        return detail if len(detail) <= LIST_DETAIL_CHARS else detail[:LIST_DETAIL_CHARS] + "…"

    def has_add_permission(self, request):
        # A job is added as the HPC_JOB_CLASS or not at all: a plain HpcJob
        # row under a subclass setting would never be dispatched (hpcd ends
        # such rows in ERROR).  The subclass's own admin, if the site
        # registers one, adds them.
        return get_job_model() is HpcJob and super().has_add_permission(request)

    def _each(self, request, queryset, method):
        for job in queryset:
            try:
                getattr(job, method)()
            except (JobStateError, HpcdError) as e:
                self.message_user(request, str(e), messages.ERROR)

    def has_cancel_permission(self, request):
        return request.user.has_perm(f"{HpcJob._meta.app_label}.cancel_hpcjob")

    def get_deleted_objects(self, objs, request):
        # A job that may run on its cluster is shown as protected: the
        # confirmation page says so and offers no "Yes" (its row would be
        # refused anyway, with JobStillRunning).
        deleted, counts, perms, protected = super().get_deleted_objects(objs, request)
        running = [job for job in objs if JobStatus(job.job_status) in ON_CLUSTER]
        protected = list(protected) + [
            f"{job}: still on cluster {job.cluster}; cancel it and delete it once it "
            "has ended" for job in running]
        return deleted, counts, perms, protected

    @admin.action(description="Cancel the selected jobs", permissions=["cancel"])
    def cancel_jobs(self, request, queryset):
        self._each(request, queryset, "cancel")

    @admin.action(description="Delete the selected jobs' data on the cluster",
                  permissions=["delete"])
    def delete_job_data(self, request, queryset):
        self._each(request, queryset, "delete_job")


@admin.register(WebsocketToken)
class WebsocketTokenAdmin(admin.ModelAdmin):
    list_display = ("id", "cluster", "purpose", "created", "expires", "used_at")
    list_filter = ("purpose",)
    readonly_fields = ("cluster", "purpose", "token_hash", "created", "expires", "used_at")

    def has_add_permission(self, request):
        return False


@admin.register(HpcInstallation)
class HpcInstallationAdmin(admin.ModelAdmin):
    """Shows this installation's id (agents name the one they serve when they
    refuse another); it is made once and never edited."""

    list_display = ("installation_id", "created")
    readonly_fields = ("installation_id", "created")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
