"""Admin pages.  Rows hpcd writes are read-only here; actions go through the
public API (cancel, delete, connect), never by editing state fields."""

from django.contrib import admin, messages

from djangoapp.ipc import HpcdError
from djangoapp.models import HpcCluster, HpcJob, HpcJobStatusChange, WebsocketToken
from djangoapp.transitions import JobStateError


@admin.register(HpcCluster)
class HpcClusterAdmin(admin.ModelAdmin):
    list_display = ("host_name", "client_path", "enabled", "online", "connected_since",
                    "status_detail")
    list_filter = ("enabled", "online")
    readonly_fields = ("online", "connected_since", "status_detail")
    actions = ["connect_now"]

    @admin.action(description="Connect now (launch the agent if it is not online)")
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


@admin.register(HpcJob)
class HpcJobAdmin(admin.ModelAdmin):
    list_display = ("id", "cluster", "job_status", "job_details", "remote_job_id",
                    "job_submitted_time", "job_finished_time")
    list_filter = ("job_status", "cluster")
    readonly_fields = ("job_status", "job_details", "remote_job_id", "job_pending_time",
                       "job_submitting_time", "job_submitted_time", "job_queued_time",
                       "job_running_time", "job_finished_time")
    inlines = [StatusChangeInline]
    actions = ["cancel_jobs", "delete_job_data"]

    def _each(self, request, queryset, method):
        for job in queryset:
            try:
                getattr(job, method)()
            except (JobStateError, HpcdError) as e:
                self.message_user(request, str(e), messages.ERROR)

    @admin.action(description="Cancel the selected jobs")
    def cancel_jobs(self, request, queryset):
        self._each(request, queryset, "cancel")

    @admin.action(description="Delete the selected jobs' data on the cluster")
    def delete_job_data(self, request, queryset):
        self._each(request, queryset, "delete_job")


@admin.register(WebsocketToken)
class WebsocketTokenAdmin(admin.ModelAdmin):
    list_display = ("id", "cluster", "purpose", "created", "expires", "used_at")
    list_filter = ("purpose",)
    readonly_fields = ("cluster", "purpose", "token_hash", "created", "expires", "used_at")

    def has_add_permission(self, request):
        return False
