"""The demo portal: the pages a site built on djangoapp needs, written only
with the app's public API (``HpcJob.submit``, ``cancel``, ``delete_job``,
``history``, ``HpcCluster.try_connect``) and its ready file views
(``djangoapp.urls``, embedded with ``djangoapp/file_browser.html``).

Copy freely.  A real portal would subclass HpcJob (an owner, a name) and
override ``user_can_access_files``; the demo keeps the stock job class, puts
the job's name in its parameters (the built-in schedulers take ``name``) and
lets its one staff user see everything.
"""

from datetime import datetime, timezone

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from djangoapp import ipc, protocol
from djangoapp.models import HpcCluster, JobStateError, JobStatus, get_job_model
from hpc_agent.status import ACTIVE, TERMINAL

#: Jobs shown on the list page, newest first.
LIST_LENGTH = 50


def _can_cancel(job):
    return job.job_status in (JobStatus.DRAFT, JobStatus.PENDING) or (
        job.job_status in ACTIVE and job.job_status != JobStatus.CANCELLING)


def _can_delete(job):
    return job.job_status in TERMINAL


def _state(job):
    """What the pages show of a job's state, and what they poll for."""
    return {"id": job.pk, "status": int(job.job_status), "label": job.job_status_display,
            "detail": job.job_details, "can_cancel": _can_cancel(job),
            "can_delete": _can_delete(job), "final": job.job_status in TERMINAL
            or job.job_status == JobStatus.DELETED}


def _name(job):
    parameters = job.job_parameters if isinstance(job.job_parameters, dict) else {}
    return parameters.get("name") or f"job {job.pk}"


# -- jobs ------------------------------------------------------------------------

@login_required
def jobs(request):
    rows = [{"job": job, "name": _name(job), "state": _state(job)}
            for job in get_job_model().objects.select_related("cluster")[:LIST_LENGTH]]
    return render(request, "portal/jobs.html", {"rows": rows})


@login_required
def job_states(request):
    """The states of the jobs a page shows (``?ids=1,2,3``): the pages poll
    this every second or two instead of reloading."""
    ids = [int(i) for i in request.GET.get("ids", "").split(",") if i.strip().isdigit()][:500]
    jobs = get_job_model().objects.filter(pk__in=ids)
    return JsonResponse({"jobs": [_state(job) for job in jobs]})


class SubmitForm(forms.Form):
    name = forms.RegexField(
        regex=r"^[A-Za-z0-9_.+-]{1,64}$", max_length=64, required=False,
        help_text="Letters, digits and _.+- (the scheduler's job name).",
        error_messages={"invalid": "Use 1-64 letters, digits or _.+-"})
    script = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 8, "spellcheck": "false"}),
        initial="echo \"hello from $(hostname)\" > hello.txt\nsleep 2\n",
        help_text="A bash script, run in the job's own directory.")
    walltime_minutes = forms.IntegerField(
        min_value=1, max_value=7 * 24 * 60, required=False, label="Walltime (minutes)",
        help_text="The job is stopped after this long (empty: no limit).")
    cluster = forms.ModelChoiceField(
        queryset=HpcCluster.objects.filter(enabled=True), required=False,
        empty_label="Choose for me", help_text="Or let choose_cluster() pick an online one.")


@login_required
def submit(request):
    form = SubmitForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        parameters = {"script": data["script"].replace("\r\n", "\n")}
        if data["name"]:
            parameters["name"] = data["name"]
        if data["walltime_minutes"]:
            parameters["walltime_seconds"] = data["walltime_minutes"] * 60
        job = get_job_model().objects.create(cluster=data["cluster"])
        job.submit(parameters)  # PENDING now; never waits for hpcd or the cluster
        messages.success(request, f"Submitted {_name(job)} (job {job.pk}).")
        return redirect("portal:job", job.pk)
    return render(request, "portal/submit.html", {"form": form})


@login_required
def job_detail(request, job_id):
    job = get_object_or_404(get_job_model().objects.select_related("cluster"), pk=job_id)
    return render(request, "portal/job.html", {
        "job": job, "name": _name(job), "state": _state(job), "history": job.history(),
        "files_ready": job.cluster_id is not None and job.job_status != JobStatus.DELETED,
    })


@login_required
@require_POST
def cancel(request, job_id):
    job = get_object_or_404(get_job_model(), pk=job_id)
    try:
        status = job.cancel()
    except JobStateError as e:
        messages.error(request, str(e))
    else:
        messages.success(request, f"Job {job.pk}: {JobStatus(status).label.lower()}.")
    return _back(request)


@login_required
@require_POST
def delete(request, job_id):
    job = get_object_or_404(get_job_model(), pk=job_id)
    try:
        job.delete_job()
    except JobStateError as e:
        messages.error(request, str(e))
    else:
        messages.success(request, f"Job {job.pk}: its files are being deleted on the cluster.")
    return _back(request)


def _back(request):
    """Back to the page the button was on (``next``), if it is one of ours."""
    target = request.POST.get("next")
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()},
                                                   request.is_secure()):
        return redirect(target)
    return redirect("portal:jobs")


# -- clusters --------------------------------------------------------------------

def _live_clusters():
    """hpcd's own view of the connections ({cluster id: row}), or None when
    hpcd does not answer (then the database's last word is shown)."""
    try:
        status = ipc.call(protocol.Status, timeout=2)["status"]
    except protocol.HpcdError:
        return None
    return {row["id"]: row for row in status["clusters"]}


@login_required
def clusters(request):
    live = _live_clusters()
    rows = []
    for cluster in HpcCluster.objects.all():
        row = {"cluster": cluster, "online": None, "since": None,
               "jobs": cluster.jobs.filter(job_status__in=ACTIVE).count()}
        if live is not None:
            info = live.get(cluster.pk, {})
            row["online"] = bool(info.get("online"))
            if info.get("since"):
                row["since"] = datetime.fromtimestamp(info["since"], timezone.utc)
        elif cluster.online:
            row["online"], row["since"] = True, cluster.connected_since
        rows.append(row)
    return render(request, "portal/clusters.html",
                  {"rows": rows, "hpcd_answers": live is not None})


@login_required
@require_POST
def connect(request, cluster_id):
    cluster = get_object_or_404(HpcCluster, pk=cluster_id)
    try:
        cluster.try_connect()
    except protocol.HpcdError as e:
        messages.error(request, f"{cluster.host_name}: {e}")
    else:
        messages.success(request, f"{cluster.host_name}: hpcd is connecting; the state "
                                  "below changes within seconds.")
    return redirect("portal:clusters")
