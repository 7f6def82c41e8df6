"""The AMP commands and errors, re-exported from their home in
:mod:`djangoapp.protocol` so that code written against ``hpcd.commands``
keeps working.  New code imports from ``djangoapp.protocol``."""

from djangoapp.protocol import *  # noqa: F401,F403
from djangoapp.protocol import __all__  # noqa: F401
