"""A wheel of the agent alone, built from this installation.

``hpc_install_agent`` uploads it to a cluster, so a cluster needs neither a
copy of the repository nor Django: the wheel holds the ``hpc_agent``
package and requires only what the agent imports (Twisted, Autobahn, txaio).
"""

import base64
import hashlib
import io
import os
import zipfile

import hpc_agent

NAME = "hpc_job_controller_agent"
REQUIRES = ["twisted[tls]>=24.7", "autobahn>=24.4", "txaio>=23.1"]


def _digest(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(
        b"=").decode()


def build():
    """``(file name, wheel bytes)``."""
    version = hpc_agent.__version__
    dist_info = f"{NAME}-{version}.dist-info"
    files = {}
    package_dir = os.path.dirname(os.path.abspath(hpc_agent.__file__))
    for root, dirs, names in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                arcname = os.path.join("hpc_agent", os.path.relpath(path, package_dir))
                with open(path, "rb") as f:
                    files[arcname.replace(os.sep, "/")] = f.read()
    metadata = ["Metadata-Version: 2.1", f"Name: {NAME.replace('_', '-')}",
                f"Version: {version}", "Summary: The hpc-job-controller cluster agent",
                "Requires-Python: >=3.10", *(f"Requires-Dist: {r}" for r in REQUIRES)]
    files[f"{dist_info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    files[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: hpc-job-controller\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = [f"{name},{_digest(data)},{len(data)}" for name, data in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return f"{NAME}-{version}-py3-none-any.whl", buffer.getvalue()
