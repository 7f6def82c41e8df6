"""wss: the agent verifies hpcd's certificate; transfers work over TLS too."""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from djangoapp.models import HpcCluster, HpcJob, JobStatus
from harness import FINAL, Hpcd, wait_for, wait_status


def self_signed(directory, name="localhost"):
    """A key and a self-signed certificate for ``name``; returns their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_agents_connect_over_wss_only_to_a_certificate_they_trust(
        transactional_db, short_tmp, settings, agent_dir):
    key, cert = self_signed(short_tmp)
    daemon = Hpcd(short_tmp, extra_env={
        "HPC_WEBSOCKET_ENDPOINT": f"ssl:0:interface=127.0.0.1:privateKey={key}:"
                                  f"certKey={cert}",
        "HPC_WEBSOCKET_PUBLIC_URL": "wss://localhost:{port}",
        "HPC_AGENT_CONNECT_TIMEOUT": "5"})
    settings.HPC_IPC_UNIX_SOCKET = daemon.socket_path
    daemon.start()
    try:
        trusting = HpcCluster.objects.create(
            host_name="localhost", client_path=agent_dir("trusting", HPC_TLS_CA_FILE=cert))
        trusting.try_connect()
        try:
            wait_for(trusting.is_connected, timeout=30, what="the agent over wss")
        except AssertionError:
            trusting.refresh_from_db()
            log = open(os.path.join(trusting.client_path, "log", "agent.log")).read()
            raise AssertionError(f"{trusting.status_detail}\n{log[-3000:]}") from None
        job = HpcJob.objects.create()
        job.submit({"script": "head -c 2000000 /dev/urandom > data.bin"})
        wait_status(job, FINAL)
        assert job.status == JobStatus.COMPLETED
        body = b"".join(job.fetch_remote_file("data.bin").streaming_content)
        with open(os.path.join(trusting.client_path, "jobs", str(job.pk), "data.bin"),
                  "rb") as f:
            assert body == f.read()

        # The system store does not know this certificate: no connection.
        doubting = HpcCluster.objects.create(host_name="localhost",
                                             client_path=agent_dir("doubting"))
        doubting.try_connect()

        def refused():
            doubting.refresh_from_db()
            return "did not connect" in doubting.status_detail

        wait_for(refused, timeout=30, what="the connect timeout")
        assert doubting.is_connected() is None
        log = open(os.path.join(doubting.client_path, "log", "agent.log")).read()
        assert "certificate verify failed" in log or "CERTIFICATE_VERIFY_FAILED" in log
    finally:
        daemon.stop()
