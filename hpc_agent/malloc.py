"""Keeping glibc's malloc from handing memory back on every file chunk.

A transfer allocates and frees megabyte buffers many times a second (each
chunk read, framed and written).  glibc gives the top of its heap back to
the kernel whenever more than ``M_TRIM_THRESHOLD`` bytes are free there, so
the next buffer faults in fresh zeroed pages again.  Measured on the agent's
send path: that churn was 0.9 s of kernel time per GiB sent, half of the
agent's CPU, and a third of its throughput.  Keeping some freed memory for
reuse costs a few MiB of resident memory, bounded by the transfers' own flow
control, and no longer grows with the file.

Used by the agent and by hpcd.  Elsewhere than glibc it does nothing.
"""

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(trim_bytes=64 * 2**20, mmap_bytes=16 * 2**20):
    """Keep up to ``trim_bytes`` of freed heap for reuse, and serve blocks
    under ``mmap_bytes`` from the heap.  Returns True where it applied."""
    try:
        # The C library Python runs on, already loaded: no
        # ctypes.util.find_library, which runs ldconfig in a subprocess at
        # every agent start.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_TRIM_THRESHOLD, trim_bytes) and
                mallopt(M_MMAP_THRESHOLD, mmap_bytes))
