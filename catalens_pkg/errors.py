"""The errors catalens raises for its callers to act on, one family: ``CatalensError``.

Each error says in its message what went wrong and what to do. Its kind says who can fix it:
``InputError`` (what was asked or given cannot be used) or ``UnavailableError`` (what was asked
needs something this index does not have yet: a model, a feature, weights, a usable index).
Entry points map the kinds, each in one place: the command line to exit codes
(``catalens.api.cli``), the HTTP API to statuses (``catalens.api.http.problems``).
"""

from __future__ import annotations


class CatalensError(Exception):
    """An error whose message is meant for the person using catalens, not a traceback."""


class InputError(CatalensError):
    """What was asked or given cannot be used (a value, a name, a file, a command line)."""


class UnavailableError(CatalensError):
    """What was asked needs something this index does not have (yet); the message says what to run."""
