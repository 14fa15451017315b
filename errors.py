"""The root of dmuserd's typed errors.

Every error the project raises on purpose derives from :class:`DmuserdError`
and says what was wrong, where, and what to do. The command line prints such
an error as one line; anything else is a bug and gets a traceback in the log.
"""


class DmuserdError(Exception):
    """Base class of every error dmuserd raises deliberately."""
