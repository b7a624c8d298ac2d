"""The one exception type for mistakes a user can make; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a folder); the message says what to do."""


class ReportedElsewhere(UserError):
    """A UserError that another process (the main one) prints: this process exits with code 2 and says nothing, so a
    run under a launcher shows the line once."""
