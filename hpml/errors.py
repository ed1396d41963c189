"""The errors a user can cause: each one prints as a single line naming the input and the fix."""


class HpmlError(Exception):
    """A problem with an input (file, model path, server, hardware); the CLI prints it and exits 1."""

    exit_code = 1


class UsageError(HpmlError):
    """A bad option value (unknown variant, wrong task, GPU-only variant on a CPU); exit 2."""

    exit_code = 2
