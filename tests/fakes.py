"""Keeping test fakes honest: a fake's methods must exist on the real class
with the same parameters, so a renamed or re-shaped method fails the unit
tests instead of drifting silently."""

import inspect


def _parameters(function):
    return [(p.name, p.kind, p.default is inspect.Parameter.empty)
            for p in inspect.signature(function).parameters.values()]


def mismatches(fake, real):
    """What of ``fake`` does not match ``real``: a list of sentences.

    Every public method of the fake must be a method of the real class
    taking the same parameters (names, kinds, which are required).  Names
    listed in the fake's ``FAKE_ONLY`` are test helpers and are skipped.
    """
    skip = set(getattr(fake, "FAKE_ONLY", ()))
    found = []
    for name, member in inspect.getmembers(fake, inspect.isfunction):
        if name.startswith("_") or name in skip:
            continue
        theirs = inspect.getattr_static(real, name, None)
        if theirs is None:
            found.append(f"{real.__name__} has no method {name!r}")
            continue
        theirs = getattr(theirs, "__func__", theirs)
        if not callable(theirs):
            found.append(f"{real.__name__}.{name} is not a method")
        elif _parameters(member) != _parameters(theirs):
            found.append(f"{fake.__name__}.{name}{inspect.signature(member)} differs from "
                         f"{real.__name__}.{name}{inspect.signature(theirs)}")
    return found


def function_mismatches(fake, real):
    """What of the function ``fake`` does not match the function ``real``.

    The same check as ``mismatches`` for a fake standing in for a module's
    function (a bound method of a fake counts without its ``self``): a list
    with one sentence if the parameters differ, else empty.
    """
    if _parameters(fake) == _parameters(real):
        return []
    return [f"{fake.__qualname__}{inspect.signature(fake)} differs from "
            f"{real.__module__}.{real.__qualname__}{inspect.signature(real)}"]
