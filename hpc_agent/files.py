"""Listing and opening job files, confined to where they may be read.

A path from hpcd is resolved inside a root (the job's working directory, or
one of the allowed roots when no job is named) *after* resolving symlinks,
and compared by path components.  The seed compared strings, so job 13's
``../131/secret.txt`` passed a prefix check against ``.../13``.
"""

import os
from pathlib import Path


class PathRefused(Exception):
    """The path is outside every root it may be read from, or does not exist."""


def _inside(path, root):
    return path == root or root in path.parents


def resolve(roots, path, job_relative=None):
    """The real path of ``path`` inside one of ``roots``, or PathRefused.

    A relative path is taken from the first root.  An absolute one must fall
    inside any root, except for a job's files (``job_relative``), where a
    leading ``/`` is ignored.  ``job_relative=None`` guesses from the roots
    (one root: a job), which the agent must not rely on: without a job and
    without extra roots there is one root too.
    """
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    if "\0" in path:
        raise PathRefused("the path contains a NUL byte")
    candidate = Path(path)
    if job_relative is None:
        job_relative = len(real_roots) == 1
    if not candidate.is_absolute() or job_relative:
        candidate = real_roots[0] / path.lstrip("/")
    resolved = Path(os.path.realpath(candidate))
    if not any(_inside(resolved, root) for root in real_roots):
        raise PathRefused(f"{path!r} is outside the directories files may be read from")
    if not resolved.exists():
        raise PathRefused(f"{path!r} does not exist")
    return resolved


def list_files(roots, path, recursive, job_relative=None):
    """``[[relative path, is_dir, size], ...]`` below ``path``.

    Paths are relative to the first root.  Symlinks are listed as what they
    point to only when that stays inside a root; otherwise they are left out,
    so a listing never reveals anything a fetch would refuse.
    """
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    top = resolve(roots, path, job_relative)
    base = real_roots[0]
    if not top.is_dir():
        return [[_relative(top, base), False, top.stat().st_size]]
    entries = []
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in children:
            real = Path(os.path.realpath(entry.path))
            if not any(_inside(real, root) for root in real_roots):
                continue
            try:
                is_dir = entry.is_dir()
                size = 0 if is_dir else entry.stat().st_size
            except OSError:
                continue
            entries.append([_relative(Path(entry.path), base), is_dir, size])
            # Follow a symlinked directory only by its own name, never twice.
            if is_dir and recursive and not entry.is_symlink():
                stack.append(Path(entry.path))
    entries.sort(key=lambda e: e[0])
    return entries


def _relative(path, base):
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)
