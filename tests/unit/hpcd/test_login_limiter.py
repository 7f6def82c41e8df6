"""SSH logins to one cluster are rationed: sites ban hosts that log in too often."""

from twisted.internet.task import Clock

from hpcd.launch import LoginLimiter, agent_command


def test_logins_beyond_the_limit_wait_for_the_minute_to_pass():
    clock = Clock()
    limiter = LoginLimiter(clock, per_minute=3)
    done = [limiter.acquire(1) for _ in range(4)]
    assert [d.called for d in done] == [True, True, True, False]
    assert limiter.delay(1) == 60
    clock.advance(59.9)
    assert not done[3].called
    clock.advance(0.2)
    assert done[3].called


def test_each_cluster_has_its_own_budget():
    clock = Clock()
    limiter = LoginLimiter(clock, per_minute=1)
    assert limiter.acquire(1).called
    assert limiter.acquire(2).called
    assert not limiter.acquire(1).called


def test_the_agent_command_quotes_the_directory_and_carries_no_secret():
    command = agent_command("/home/u/my agent; rm -rf ~")
    assert command.startswith("cd '/home/u/my agent; rm -rf ~' && ")
    assert command.endswith("exec venv/bin/python -m hpc_agent")
