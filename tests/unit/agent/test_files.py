"""Listing and resolving job files, confined to their roots (hpc_agent.files)."""

import hashlib
import json
import os
import socket
import threading
import time

import pytest

from hpc_agent.files import PathRefused, checksum, list_files, open_file, page, resolve


@pytest.fixture
def tree(tmp_path):
    """jobs/13 (the job), jobs/131 (a sibling sharing its prefix), shared/ (an extra root),
    outside/ (nothing may be read there)."""
    jobs = tmp_path / "jobs"
    job = jobs / "13"
    (job / "sub" / "deeper").mkdir(parents=True)
    (job / "a.txt").write_bytes(b"x" * 5)
    (job / "sub" / "b.bin").write_bytes(b"y" * 1234)
    (job / "sub" / "deeper" / "c").write_bytes(b"")
    (jobs / "131").mkdir()
    (jobs / "131" / "secret").write_text("not yours")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "results.csv").write_text("1,2,3\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "passwd").write_text("root:x:0:0")
    return tmp_path


def job_root(tree):
    return [str(tree / "jobs" / "13")]


def listing(entries):
    return {path: (is_dir, size) for path, is_dir, size in entries}


# -- resolve --------------------------------------------------------------------

@pytest.mark.parametrize("path", ["a.txt", "/a.txt", "sub/b.bin", "sub/../a.txt", "./a.txt"])
def test_paths_inside_the_job_directory_resolve(tree, path):
    resolved = resolve(job_root(tree), path)
    assert resolved.parent in (tree / "jobs" / "13", tree / "jobs" / "13" / "sub")
    assert resolved.exists()


def test_the_job_directory_itself_resolves(tree):
    assert resolve(job_root(tree), "/") == tree / "jobs" / "13"
    assert resolve(job_root(tree), "") == tree / "jobs" / "13"


def test_a_sibling_sharing_the_job_ids_prefix_is_refused(tree):
    """The seed's bug: job 13 could read ../131/secret past a string-prefix check."""
    with pytest.raises(PathRefused, match="outside"):
        resolve(job_root(tree), "../131/secret")
    with pytest.raises(PathRefused, match="outside"):
        list_files(job_root(tree), "../131", recursive=True)


@pytest.mark.parametrize("path", ["..", "../..", "sub/../../131", "../../outside/passwd",
                                  "../../../../../../../../etc/passwd"])
def test_dotdot_escapes_are_refused(tree, path):
    with pytest.raises(PathRefused, match="outside"):
        resolve(job_root(tree), path)
    with pytest.raises(PathRefused):
        list_files(job_root(tree), path, recursive=False)


def test_absolute_paths_outside_are_refused(tree):
    outside = str(tree / "outside" / "passwd")
    with pytest.raises(PathRefused):
        resolve(job_root(tree), outside)
    with pytest.raises(PathRefused):
        resolve(job_root(tree), "/etc/passwd")
    with pytest.raises(PathRefused, match="outside"):
        resolve([str(tree / "jobs"), str(tree / "shared")], outside)


def test_a_symlink_pointing_outside_is_refused(tree):
    job = tree / "jobs" / "13"
    os.symlink(tree / "outside", job / "out-link")
    os.symlink(tree / "outside" / "passwd", job / "passwd-link")
    os.symlink(tree / "jobs" / "131", job / "sibling-link")
    for path in ("out-link", "out-link/passwd", "passwd-link", "sibling-link/secret"):
        with pytest.raises(PathRefused, match="outside"):
            resolve(job_root(tree), path)


def test_a_symlink_inside_the_job_directory_is_allowed(tree):
    job = tree / "jobs" / "13"
    os.symlink(job / "sub" / "b.bin", job / "b-link")
    os.symlink("sub", job / "sub-link")
    assert resolve(job_root(tree), "b-link") == job / "sub" / "b.bin"
    assert resolve(job_root(tree), "sub-link/b.bin") == job / "sub" / "b.bin"


def test_a_job_directory_reached_through_a_symlink_still_confines(tree):
    os.symlink(tree / "jobs" / "13", tree / "job-alias")
    assert resolve([str(tree / "job-alias")], "a.txt") == tree / "jobs" / "13" / "a.txt"
    with pytest.raises(PathRefused):
        resolve([str(tree / "job-alias")], "../131/secret")


def test_a_nul_byte_is_refused(tree):
    with pytest.raises(PathRefused, match="NUL"):
        resolve(job_root(tree), "a.txt\0../../outside/passwd")


def test_a_missing_path_is_refused_as_missing(tree):
    with pytest.raises(PathRefused, match="does not exist"):
        resolve(job_root(tree), "missing.txt")
    with pytest.raises(PathRefused, match="does not exist"):
        list_files(job_root(tree), "missing-dir", recursive=True)


def test_extra_roots_allow_absolute_paths_inside_any_of_them(tree):
    roots = [str(tree / "jobs"), str(tree / "shared")]
    assert resolve(roots, str(tree / "shared" / "results.csv")) == \
        tree / "shared" / "results.csv"
    assert resolve(roots, str(tree / "jobs" / "13" / "a.txt")) == tree / "jobs" / "13" / "a.txt"
    # Relative paths are taken from the first root.
    assert resolve(roots, "13/a.txt") == tree / "jobs" / "13" / "a.txt"
    with pytest.raises(PathRefused):
        resolve(roots, "results.csv")
    # Without a job, paths are absolute: "/" is the file system's root.
    with pytest.raises(PathRefused, match="outside"):
        resolve(roots, "/")


# -- list_files -----------------------------------------------------------------

def test_a_recursive_listing_has_every_entry_with_its_size(tree):
    assert listing(list_files(job_root(tree), "/", recursive=True)) == {
        "a.txt": (False, 5), "sub": (True, 0), "sub/b.bin": (False, 1234),
        "sub/deeper": (True, 0), "sub/deeper/c": (False, 0)}


def test_a_listing_is_sorted_by_path(tree):
    paths = [p for p, _, _ in list_files(job_root(tree), "/", recursive=True)]
    assert paths == sorted(paths)


def test_a_non_recursive_listing_stops_at_the_first_level(tree):
    assert listing(list_files(job_root(tree), "/", recursive=False)) == {
        "a.txt": (False, 5), "sub": (True, 0)}
    assert listing(list_files(job_root(tree), "sub", recursive=False)) == {
        "sub/b.bin": (False, 1234), "sub/deeper": (True, 0)}


def test_listing_a_file_gives_that_file(tree):
    assert list_files(job_root(tree), "sub/b.bin", recursive=True) == [["sub/b.bin", False, 1234]]


def test_a_listing_leaves_out_symlinks_pointing_outside(tree):
    job = tree / "jobs" / "13"
    os.symlink(tree / "outside", job / "out-link")
    os.symlink(tree / "outside" / "passwd", job / "sub" / "passwd-link")
    os.symlink(tree / "jobs" / "131", job / "sibling-link")
    os.symlink("/nonexistent/dangling", job / "dangling")
    paths = {p for p, _, _ in list_files(job_root(tree), "/", recursive=True)}
    assert paths == {"a.txt", "sub", "sub/b.bin", "sub/deeper", "sub/deeper/c"}


def test_a_listing_shows_symlinks_inside_as_their_targets_without_following_twice(tree):
    job = tree / "jobs" / "13"
    os.symlink(job / "sub" / "b.bin", job / "b-link")
    os.symlink(job / "sub", job / "sub-link")
    os.symlink(job, job / "sub" / "loop")  # a cycle must not hang the listing
    entries = listing(list_files(job_root(tree), "/", recursive=True))
    assert entries["b-link"] == (False, 1234)
    assert entries["sub-link"] == (True, 0)
    assert entries["sub/loop"] == (True, 0)
    assert "sub-link/b.bin" not in entries and "sub/loop/a.txt" not in entries


def test_a_listing_of_extra_roots_names_files_outside_the_first_root_absolutely(tree):
    roots = [str(tree / "jobs"), str(tree / "shared")]
    assert list_files(roots, str(tree / "shared"), recursive=True) == [
        [str(tree / "shared" / "results.csv"), False, 6]]
    assert listing(list_files(roots, "13", recursive=False)) == {
        "13/a.txt": (False, 5), "13/sub": (True, 0)}


def test_a_listing_of_the_whole_tree_with_extra_roots_stays_inside_them(tree):
    roots = [str(tree / "jobs"), str(tree / "shared")]
    os.symlink(tree / "outside", tree / "jobs" / "13" / "out-link")
    os.symlink(tree / "shared", tree / "jobs" / "13" / "shared-link")
    entries = listing(list_files(roots, str(tree / "jobs"), recursive=True))
    assert "131/secret" in entries and "13/a.txt" in entries
    assert not any("results.csv" in p or "passwd" in p for p in entries)
    assert "13/out-link" not in entries
    assert entries["13/shared-link"] == (True, 0)


# -- opening: regular files only, confined by descriptor ---------------------------

def opened_bytes(opened):
    try:
        return opened.handle.read()
    finally:
        opened.close()


def in_thread(f, *args, timeout=10, **kwargs):
    """Run ``f`` on a thread and give up waiting after ``timeout``: a call
    that blocks fails the test instead of hanging it."""
    outcome = {}

    def work():
        try:
            outcome["result"] = f(*args, **kwargs)
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{f.__name__} blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_open_file_gives_the_bytes_of_a_file_inside(tree):
    opened = open_file(job_root(tree), "sub/b.bin")
    assert (opened.name, opened.size, opened.total_size) == ("b.bin", 1234, 1234)
    assert opened_bytes(opened) == b"y" * 1234


def test_open_file_refuses_a_directory(tree):
    with pytest.raises(PathRefused, match="directory"):
        open_file(job_root(tree), "sub")


def test_a_fifo_is_refused_at_once_and_never_opened_for_reading(tree):
    """Issue 9: open() of a FIFO blocked a worker thread for good."""
    job = tree / "jobs" / "13"
    os.mkfifo(job / "pipe")
    os.symlink("pipe", job / "pipe-link")
    for path in ("pipe", "pipe-link", "/pipe"):
        with pytest.raises(PathRefused, match="FIFO"):
            in_thread(open_file, job_root(tree), path)
    with pytest.raises(PathRefused, match="FIFO"):
        in_thread(open_file, [], str(job / "pipe"), confined=False)
    with pytest.raises(PathRefused, match="FIFO"):
        in_thread(checksum, job_root(tree), "pipe")


def test_device_files_and_sockets_are_refused(tree):
    job = tree / "jobs" / "13"
    os.symlink("/dev/zero", job / "zeros")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(job / "sock"))
    try:
        with pytest.raises(PathRefused):
            in_thread(open_file, job_root(tree), "zeros")  # outside, and a device
        with pytest.raises(PathRefused, match="device"):
            in_thread(open_file, ["/dev"], "/dev/zero", job_relative=False)
        with pytest.raises(PathRefused, match="device"):
            in_thread(open_file, [], "/dev/zero", confined=False)
        with pytest.raises(PathRefused, match="socket"):
            open_file(job_root(tree), "sock")
    finally:
        server.close()


def test_a_listing_leaves_out_fifos_and_sockets(tree):
    os.mkfifo(tree / "jobs" / "13" / "pipe")
    assert "pipe" not in listing(list_files(job_root(tree), "/", recursive=True))


def test_a_range_is_opened_at_its_offset_with_the_size_to_send(tree):
    (tree / "jobs" / "13" / "data").write_bytes(bytes(range(100)))
    opened = open_file(job_root(tree), "data", offset=10, length=5)
    assert (opened.offset, opened.size, opened.total_size) == (10, 5, 100)
    assert opened.handle.read(opened.size) == bytes(range(10, 15))
    opened.close()
    opened = open_file(job_root(tree), "data", offset=95, length=50)
    assert opened.size == 5
    opened.close()
    assert open_file(job_root(tree), "data", offset=100).size == 0
    with pytest.raises(PathRefused, match="past the end"):
        open_file(job_root(tree), "data", offset=101)
    with pytest.raises(PathRefused, match="negative"):
        open_file(job_root(tree), "data", offset=-1)


def test_a_hooks_absolute_path_inside_the_job_directory_is_taken_as_it_is(tree):
    path = str(tree / "jobs" / "13" / "sub" / "b.bin")
    assert opened_bytes(open_file(job_root(tree), path, absolute_inside=True)) == b"y" * 1234
    # A request's leading / is the job directory's, whatever follows.
    with pytest.raises(PathRefused, match="does not exist"):
        open_file(job_root(tree), path)
    with pytest.raises(PathRefused, match="outside"):
        open_file(job_root(tree), str(tree / "outside" / "passwd"), absolute_inside=True)


def test_a_symlink_loop_is_refused(tree):
    job = tree / "jobs" / "13"
    os.symlink("loop-b", job / "loop-a")
    os.symlink("loop-a", job / "loop-b")
    with pytest.raises(PathRefused, match="too many symbolic links"):
        open_file(job_root(tree), "loop-a")


def test_relative_and_absolute_symlinks_inside_are_followed_by_the_walk(tree):
    job = tree / "jobs" / "13"
    os.symlink("../a.txt", job / "sub" / "up")
    os.symlink(str(job / "sub"), job / "abs-sub")
    os.symlink("abs-sub/../../131/secret", job / "sneaky")
    assert opened_bytes(open_file(job_root(tree), "sub/up")) == b"x" * 5
    assert opened_bytes(open_file(job_root(tree), "abs-sub/up")) == b"x" * 5
    with pytest.raises(PathRefused, match="outside"):
        open_file(job_root(tree), "sneaky")


def test_checksum_reads_the_whole_file_and_beats_as_it_goes(tree):
    data = os.urandom(3 * 1024 + 5)
    (tree / "jobs" / "13" / "data").write_bytes(data)
    beats = []
    result = checksum(job_root(tree), "data", chunk_size=1024, beat=lambda: beats.append(1))
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["size"] == len(data) and len(beats) == 4
    assert result["mtime"] == os.stat(tree / "jobs" / "13" / "data").st_mtime


def test_a_listing_can_carry_mtimes(tree):
    os.utime(tree / "jobs" / "13" / "a.txt", (1_600_000_000, 1_600_000_000))
    entries = {e[0]: e for e in list_files(job_root(tree), "/", recursive=False,
                                           with_mtime=True)}
    assert entries["a.txt"] == ["a.txt", False, 5, 1_600_000_000.0]
    assert len(entries["sub"]) == 4


def test_page_keeps_a_page_under_its_byte_budget_and_always_moves_on():
    entries = [[f"{'x' * 100}{i:03}", False, i] for i in range(100)]
    first, following = page(entries, max_bytes=2000)
    assert 0 < len(first) < 100 and following == len(first)
    assert len(json.dumps(first)) <= 2000
    rest, end = page(entries, offset=following, limit=5)
    assert rest == entries[following:following + 5] and end == following + 5
    (huge,), after = page([["y" * 5000, False, 1], ["z", False, 1]], max_bytes=100)
    assert huge[0] == "y" * 5000 and after == 1
    assert page(entries, offset=100) == ([], None)


# -- the race a swapping job ran --------------------------------------------------------

def test_a_directory_swapped_for_a_symlink_never_serves_what_is_outside(tmp_path):
    """Issue 9: a job swapping a directory for a symlink between the check
    and the open got the agent's own settings.py served, 440 times in 30 s."""
    agent_dir = tmp_path / "agent"
    job = agent_dir / "jobs" / "13"
    (job / "sub").mkdir(parents=True)
    (job / "sub" / "settings.py").write_text("inside")
    (agent_dir / "settings.py").write_text("SECRET = 'the agent's own'")
    (agent_dir / "state.sqlite3").write_text("")
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            os.rename(job / "sub", job / "sub.real")
            os.symlink(agent_dir, job / "sub")
            os.unlink(job / "sub")
            os.rename(job / "sub.real", job / "sub")

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    served, refused, listed = [], 0, set()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                served.append(opened_bytes(open_file([str(job)], "sub/settings.py")))
            except PathRefused:
                refused += 1
            try:
                listed |= {e[0] for e in list_files([str(job)], "/", recursive=True)}
            except PathRefused:
                pass
    finally:
        stop.set()
        swapper.join()
    assert served and set(served) == {b"inside"}
    assert not any("state.sqlite3" in name or name.startswith("sub/jobs") for name in listed)
