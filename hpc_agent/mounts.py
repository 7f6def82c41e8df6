"""Which file system a path is on, and what that allows SQLite.

SQLite's WAL keeps an index in shared memory beside the database file, which
must not be used on a network file system (SQLite's documentation says so):
there the agent's state uses a rollback journal.
"""

import os

#: File systems where SQLite's WAL (shared memory beside the file) must not be used.
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
    "fuse.glusterfs", "fuse.sshfs", "fuse.beegfs", "9p", "afs", "panfs", "pvfs2", "orangefs"})


def file_system_type(path, mountinfo="/proc/self/mountinfo"):
    """The type of the file system ``path`` is on (Linux), or None."""
    path = os.path.realpath(path)
    best, kind = "", None
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                mount = fields[4].replace("\\040", " ")
                fstype = fields[fields.index("-") + 1]
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fstype
    except (OSError, ValueError, IndexError):
        return None
    return kind


def journal_mode(path):
    """WAL on a local file system, a rollback journal on a network one."""
    kind = file_system_type(os.path.dirname(os.path.abspath(path)))
    return "TRUNCATE" if kind in NETWORK_FILE_SYSTEMS else "WAL"
