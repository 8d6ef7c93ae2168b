"""The one exception type for problems a user can fix (bad input, bad flag, missing file): exit code 2."""


class MoebenchError(Exception):
    """A problem with the user's input. The CLI prints its message on one line and exits with `exit_code`."""

    exit_code = 2


class CheckFailed(MoebenchError):
    """A check ran and failed (validation, accuracy): exit code 1."""

    exit_code = 1


class SubmissionFault(CheckFailed):
    """The submission crashed, hung past its time limit or raised while being evaluated: a failed evaluation."""
