"""The two kinds of failure a run reports, each with its own exit code."""


class UsageError(Exception):
    """Bad usage or input: a wrong option, value, file or directory (exit code 2).

    The message names the bad value and says what is accepted.
    """

    exit_code = 2


class RunFailed(Exception):
    """A run that started correctly but could not finish (exit code 1).

    Example: a non-finite loss. Checkpoints written before the failure stay intact.
    """

    exit_code = 1
