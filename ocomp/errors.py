"""Errors that the CLI turns into one-line messages (never tracebacks)."""

from __future__ import annotations


class OcompError(Exception):
    """Bad input or an unsupported model: the CLI prints the message and exits with 1."""


class UsageError(OcompError):
    """Wrong options or pass names: the CLI exits with 2."""


class PassError(OcompError):
    """A pass broke a postcondition; the message names the pass and the ones that ran before it."""


class GuardError(OcompError):
    """The compressed model failed the accuracy guard (ocomp.guard); nothing was written. The CLI exits with 3."""


class OcompWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one `warning:` line."""
