"""Scheduler classes whose commands answer from a script, for unit tests.

Every process a batch scheduler starts goes through its ``run`` class
method; replacing that one method is the whole fake.
"""

import subprocess


def scripted(base, key=lambda argv: argv[0]):
    """A subclass of ``base`` answering from ``answers`` and logging ``calls``.

    ``answers`` maps ``key(argv)`` (the program, by default) to an output
    string, a ``(returncode, stdout, stderr)`` triple, or a function of argv
    returning either.
    """

    class Scripted(base):
        answers = {}
        calls = []
        cwds = []  # the working directory of each call (None: the agent's)

        @classmethod
        def run(cls, argv, timeout=None, cwd=None):
            cls.calls.append(list(argv))
            cls.cwds.append(cwd)
            answer = cls.answers[key(argv)]
            if callable(answer):
                answer = answer(argv)
            if isinstance(answer, str):
                answer = (0, answer, "")
            return subprocess.CompletedProcess(argv, *answer)

    Scripted.__name__ = f"Scripted{base.__name__}"
    return Scripted


def counted(base):
    """A subclass of ``base`` that runs its commands for real and records
    each in ``spawned``: ``{"argv", "stdout", "cwd"}``."""

    class Counted(base):
        spawned = []

        @classmethod
        def run(cls, argv, timeout=None, cwd=None):
            result = super().run(argv, timeout, cwd)
            cls.spawned.append({"argv": list(argv), "stdout": result.stdout, "cwd": cwd})
            return result

    Counted.__name__ = f"Counted{base.__name__}"
    return Counted
