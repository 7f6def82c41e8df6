"""The ready file views (djangoapp.urls) through Django's test client, with a
live hpcd and agent: ranges, conditional requests, errors, uploads, archives."""

import hashlib
import io
import os
import tarfile

import pytest
from django.urls import reverse

from djangoapp.models import HpcCluster, HpcJob
from djangoapp.protocol import FileMissing, PathRefused, TooLarge
from harness import FINAL, job_dir, wait_for, wait_status

DATA = bytes(range(256)) * 4000  # 1,024,000 bytes, each position recognisable


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("staff", password="pw", is_staff=True)


@pytest.fixture
def client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def job(local_cluster):
    """A finished job with a binary file, a text file and a sub-directory."""
    job = HpcJob.objects.create()
    job.submit({"script": "mkdir -p sub/deeper && echo hello > sub/hello.txt"
                          " && echo deep > sub/deeper/d.txt && echo done"})
    wait_status(job, FINAL)
    with open(os.path.join(job_dir(local_cluster, job), "data.bin"), "wb") as f:
        f.write(DATA)
    return job


def url(job, path):
    return reverse("hpc:job-file", args=[job.pk, path])


def body(response):
    return b"".join(response.streaming_content) if response.streaming else response.content


def test_a_whole_file_with_its_validators(client, job):
    response = client.get(url(job, "data.bin"))
    assert response.status_code == 200
    assert body(response) == DATA
    assert response["Content-Length"] == str(len(DATA))
    assert response["Accept-Ranges"] == "bytes"
    assert response["ETag"].startswith('"') and response["Last-Modified"].endswith("GMT")
    assert response["Content-Disposition"] == 'attachment; filename="data.bin"'
    assert response["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("header, start, end", [
    ("bytes=0-99", 0, 99),                      # the first bytes
    ("bytes=0-", 0, len(DATA) - 1),             # all of it, as a range
    ("bytes=500000-500999", 500000, 500999),    # the middle
    (f"bytes={len(DATA) - 10}-", len(DATA) - 10, len(DATA) - 1),  # to the end
    ("bytes=-100", len(DATA) - 100, len(DATA) - 1),  # a suffix
    (f"bytes=1000-{10 * len(DATA)}", 1000, len(DATA) - 1),  # an end past the file
])
def test_a_range_is_a_206_with_just_those_bytes(client, job, header, start, end):
    response = client.get(url(job, "data.bin"), HTTP_RANGE=header)
    assert response.status_code == 206
    assert body(response) == DATA[start:end + 1]
    assert response["Content-Range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert response["Content-Length"] == str(end - start + 1)


@pytest.mark.parametrize("header", [f"bytes={len(DATA)}-", f"bytes={len(DATA) + 5}-9999999",
                                    "bytes=-0"])
def test_an_unsatisfiable_range_is_a_416_naming_the_size(client, job, header):
    response = client.get(url(job, "data.bin"), HTTP_RANGE=header)
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{len(DATA)}"


def test_several_ranges_are_answered_with_the_whole_file(client, job):
    response = client.get(url(job, "data.bin"), HTTP_RANGE="bytes=0-1,5-6")
    assert response.status_code == 200
    assert body(response) == DATA


def test_head_sends_the_headers_without_the_body(client, job):
    response = client.head(url(job, "data.bin"))
    assert response.status_code == 200
    assert response.content == b""
    assert response["Content-Length"] == str(len(DATA))
    full = client.get(url(job, "data.bin"))
    assert (response["ETag"], response["Last-Modified"]) == (full["ETag"], full["Last-Modified"])
    ranged = client.head(url(job, "data.bin"), HTTP_RANGE="bytes=-10")
    assert ranged.status_code == 206
    assert ranged["Content-Range"] == f"bytes {len(DATA) - 10}-{len(DATA) - 1}/{len(DATA)}"


def test_if_range_resumes_only_the_same_file(client, job, local_cluster):
    etag = client.head(url(job, "data.bin"))["ETag"]
    response = client.get(url(job, "data.bin"), HTTP_RANGE="bytes=100-", HTTP_IF_RANGE=etag)
    assert response.status_code == 206
    assert body(response) == DATA[100:]
    stale = client.get(url(job, "data.bin"), HTTP_RANGE="bytes=100-",
                       HTTP_IF_RANGE='"0-0"')
    assert stale.status_code == 200
    assert body(stale) == DATA


def test_if_none_match_is_a_304_until_the_file_changes(client, job, local_cluster):
    etag = client.head(url(job, "data.bin"))["ETag"]
    assert client.get(url(job, "data.bin"), HTTP_IF_NONE_MATCH=etag).status_code == 304
    with open(os.path.join(job_dir(local_cluster, job), "data.bin"), "ab") as f:
        f.write(b"more")
    response = client.get(url(job, "data.bin"), HTTP_IF_NONE_MATCH=etag)
    assert response.status_code == 200
    assert body(response) == DATA + b"more"


def test_a_name_any_browser_can_save_is_sent_for_any_file_name(client, job, local_cluster):
    with open(os.path.join(job_dir(local_cluster, job), 'résumé "1".txt'), "w") as f:
        f.write("x")
    response = client.get(url(job, 'résumé "1".txt'))
    assert response.status_code == 200
    assert "filename*=utf-8''r%C3%A9sum%C3%A9%20%221%22.txt" in response["Content-Disposition"]
    assert response["Content-Type"].startswith("text/plain")


def test_the_file_list_has_sizes_and_times(client, job):
    response = client.get(reverse("hpc:job-files", args=[job.pk]), {"recursive": "1"})
    assert response.status_code == 200
    files = {f["path"]: f for f in response.json()["files"]}
    assert files["data.bin"]["size"] == len(DATA) and files["data.bin"]["is_dir"] is False
    assert files["sub"]["is_dir"] is True
    assert "sub/deeper/d.txt" in files
    assert all(isinstance(f["mtime"], float) for f in files.values())
    top = client.get(reverse("hpc:job-files", args=[job.pk]), {"path": "/sub"}).json()
    assert sorted(f["path"] for f in top["files"]) == ["sub/deeper", "sub/hello.txt"]


def test_a_missing_file_or_job_is_a_404_and_a_refused_path_a_403(client, job):
    assert client.get(url(job, "nothing.txt")).status_code == 404
    assert client.head(url(job, "nothing.txt")).status_code == 404
    missing_job = client.get(reverse("hpc:job-files", args=[job.pk + 1000]))
    assert missing_job.status_code == 404 and "does not exist" in missing_job.json()["error"]
    refused = client.get(url(job, "../../etc/passwd"))
    assert refused.status_code in (403, 404)  # Django may collapse the dots first
    refused = client.get(reverse("hpc:job-files", args=[job.pk]), {"path": "../.."})
    assert refused.status_code == 403
    assert client.get(url(job, "sub")).status_code == 403  # a directory is no file
    with pytest.raises(FileMissing):
        job.fetch_remote_file("nothing.txt")
    with pytest.raises(PathRefused):  # still what code written before FileMissing catches
        job.fetch_remote_file("nothing.txt")


def test_access_is_the_jobs_decision(client, job, django_user_model, monkeypatch):
    plain = django_user_model.objects.create_user("plain", password="pw")
    other = type(client)()
    other.force_login(plain)
    assert other.get(url(job, "data.bin")).status_code == 403
    assert type(client)().get(url(job, "data.bin")).status_code == 403  # anonymous
    monkeypatch.setattr(HpcJob, "user_can_access_files",
                        lambda self, user, write=False: user.username == "plain" and not write)
    assert other.get(url(job, "data.bin")).status_code == 200
    upload = other.post(reverse("hpc:job-upload", args=[job.pk]),
                        {"file": io.BytesIO(b"x")})
    assert upload.status_code == 403


def test_an_offline_cluster_is_a_503(client, job, local_cluster):
    offline = HpcCluster.objects.create(host_name="localhost", client_path="/nonexistent")
    stranded = HpcJob.objects.create(cluster=offline)
    response = client.get(reverse("hpc:job-files", args=[stranded.pk]))
    assert response.status_code == 503
    assert response["Retry-After"]
    assert "cluster" in response.json()["error"]
    assert client.get(url(stranded, "x")).status_code == 503


def test_hpcd_down_is_a_503(client, job, hpcd):
    hpcd.stop()
    response = client.get(url(job, "data.bin"))
    assert response.status_code == 503
    assert b"hpcd" in response.content


def test_an_upload_arrives_with_its_checksum(client, job, local_cluster):
    data = os.urandom(3 * 1024 * 1024 + 17)
    upload = io.BytesIO(data)
    upload.name = "input.dat"
    response = client.post(reverse("hpc:job-upload", args=[job.pk]),
                           {"file": upload, "path": "inputs/new"})
    assert response.status_code == 201, response.content
    answer = response.json()
    assert answer["path"] == "inputs/new/input.dat"
    assert answer["size"] == len(data)
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()
    assert job.file_checksum("inputs/new/input.dat")["sha256"] == answer["sha256"]
    with open(os.path.join(job_dir(local_cluster, job), "inputs", "new", "input.dat"),
              "rb") as f:
        assert f.read() == data
    assert os.listdir(os.path.join(job_dir(local_cluster, job), "inputs", "new")) == \
        ["input.dat"]


def test_an_upload_before_submission_makes_the_job_directory(job, local_cluster):
    draft = HpcJob.objects.create(cluster=local_cluster)
    result = draft.upload_file("/in.txt", io.BytesIO(b"42\n"))
    assert result["size"] == 3
    draft.submit({"script": "cat in.txt > out.txt"})
    wait_status(draft, FINAL)
    assert b"".join(draft.fetch_remote_file("out.txt").streaming_content) == b"42\n"
    mode = os.stat(job_dir(local_cluster, draft)).st_mode & 0o777
    assert mode == 0o700  # HPC_JOB_DIRECTORY_MODE's default, as a submission makes it


def test_an_upload_too_large_or_cut_off_leaves_the_old_file(job, local_cluster, settings):
    path = os.path.join(job_dir(local_cluster, job), "sub", "hello.txt")
    settings.HPC_UPLOAD_MAX_BYTES = 1000
    with pytest.raises(TooLarge):
        job.upload_file("sub/hello.txt", io.BytesIO(b"x" * 5000))

    class Broken(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 0:
                raise OSError("the browser went away")
            return super().read(500)

    settings.HPC_UPLOAD_MAX_BYTES = None
    with pytest.raises(OSError):
        job.upload_file("sub/hello.txt", Broken(b"y" * 5000))
    with open(path) as f:
        assert f.read() == "hello\n"
    # The agent removes its temporary file once hpcd tells it the upload broke.
    wait_for(lambda: sorted(os.listdir(os.path.dirname(path))) == ["deeper", "hello.txt"],
             what="the partial upload to be removed")


def test_an_upload_cannot_escape_or_replace_a_directory(job):
    with pytest.raises(PathRefused):
        job.upload_file("../escape.txt", io.BytesIO(b"x"))
    with pytest.raises(PathRefused):
        job.upload_file("sub", io.BytesIO(b"x"))


@pytest.mark.parametrize("compress", [False, True])
def test_a_directory_as_a_tar_extracts_to_the_same_files(client, job, local_cluster, compress,
                                                         tmp_path):
    response = client.get(reverse("hpc:job-archive", args=[job.pk]),
                          {"gzip": "1" if compress else "0"})
    assert response.status_code == 200
    data = body(response)
    name = f"job-{job.pk}.tar" + (".gz" if compress else "")
    assert response["Content-Disposition"] == f'attachment; filename="{name}"'
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
        archive.extractall(tmp_path, filter="data")
    root = tmp_path / f"job-{job.pk}"
    assert (root / "data.bin").read_bytes() == DATA
    assert (root / "sub" / "hello.txt").read_text() == "hello\n"
    assert (root / "sub" / "deeper" / "d.txt").read_text() == "deep\n"
    sub = client.get(reverse("hpc:job-archive", args=[job.pk]), {"path": "sub/deeper"})
    with tarfile.open(fileobj=io.BytesIO(body(sub)), mode="r|") as archive:
        assert [m.name for m in archive] == [f"job-{job.pk}-sub-deeper/d.txt"]


def test_ranges_through_the_api_and_the_checksum(job):
    response = job.fetch_remote_file("/data.bin", offset=10, length=20)
    assert response.status_code == 206
    assert b"".join(response.streaming_content) == DATA[10:30]
    assert response.file_info["total_size"] == len(DATA)
    assert job.file_checksum("/data.bin") == {
        "sha256": hashlib.sha256(DATA).hexdigest(), "size": len(DATA),
        "mtime": response.file_info["mtime"]}
