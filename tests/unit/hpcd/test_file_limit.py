"""hpcd raises its soft limit on open files at start (hpcd.service)."""

import resource

from hpcd.service import raise_file_limit


def test_the_soft_limit_is_raised_towards_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raise_file_limit(ceiling=4096)
        expected = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == expected
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
