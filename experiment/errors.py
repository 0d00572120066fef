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


def command_exit_code(body, interrupted: str = "interrupted") -> int:
    """Run a command-line entry point's `body()` (returning its exit code): a UsageError or
    an argparse error is one line and exit 2, Ctrl-C is `interrupted` and exit 130."""
    import argparse
    import sys

    try:
        return body()
    except (argparse.ArgumentError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
