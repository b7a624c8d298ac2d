"""What every `emd-t2i` command shares: a user's mistake as one line and exit code 2, help shown as written."""

from __future__ import annotations

import functools

import typer

from .errors import UserError


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def user_errors(fn):
    """A user's mistake ends in one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise fail(str(err)) from None

    return wrapper


def _literal(text: str) -> str:
    """Help printed as written: typer's rich markup (its default when rich is installed) eats "[default: ...]"."""
    if typer.core.DEFAULT_MARKUP_MODE != "rich":
        return text
    from rich.markup import escape

    return escape(text)
