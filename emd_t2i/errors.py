"""The one exception type for mistakes a user can make; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a folder); the message says what to do."""
