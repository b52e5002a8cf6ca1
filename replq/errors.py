"""Typed errors with operator-facing messages.

Every error a user can meet is a ReplqError: its str() is the one line printed on stderr.
`retryable` tells the runtime whether trying again later can help (a network drop can;
a bad schedule cannot).
"""


class ReplqError(Exception):
    """Base class: message is shown to the operator as is."""

    retryable = False
    exit_code = 1


class ValidationError(ReplqError):
    """Input that does not satisfy the model's rules (bad id, name, rate, schedule...)."""


class NotFound(ReplqError):
    """A referenced object (node, storage, guest, job) does not exist."""


class Conflict(ReplqError):
    """The change would break a uniqueness or consistency rule, or a digest is stale."""


class ServiceError(ReplqError):
    """An outside system (Redis, SSH, zfs) failed; usually worth retrying."""

    retryable = True
