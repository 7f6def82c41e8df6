"""Listing and resolving job files, confined to their roots (hpc_agent.files)."""

import os

import pytest

from hpc_agent.files import PathRefused, list_files, resolve


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
