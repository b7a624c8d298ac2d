"""What every `emd-t2i` command shares: a user's mistake as one line and exit code 2, help shown as written."""

from __future__ import annotations

import functools
import typing
from pathlib import Path

import typer

from emd_t2i.errors import ReportedElsewhere, UserError
from emd_t2i.files import wrong_kind


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def folder_flag(flag: str, path) -> None:
    """Refuse, before any work, a flag that names an existing file where the command will write a folder."""
    if path is not None and Path(path).expanduser().exists() and not Path(path).expanduser().is_dir():
        raise UserError(f"{flag} {path} is a file where a folder is expected: give a folder (or a new path)")


def file_flag(flag: str, path) -> None:
    """Refuse, before any work, a flag that names an existing folder where the command will write a file."""
    if path is not None and Path(path).expanduser().is_dir():
        raise UserError(f"{flag} {path} is a folder where a file is expected: give the path of a file")


def user_errors(fn):
    """A user's mistake ends in one line on stderr and exit code 2, never a traceback: a UserError, or a path that
    names a file where a folder is expected or the reverse, wherever the command met it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ReportedElsewhere:
            raise typer.Exit(2) from None
        except UserError as err:
            raise fail(str(err)) from None
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as err:
            raise fail(wrong_kind(err, _flag_of(fn, kwargs, err.filename))) from None

    return wrapper


def _flag_of(fn, given: dict, filename) -> str | None:
    """The flag (or argument) of `fn` whose value is `filename` or a folder above it."""
    if not filename:
        return None
    path, hints = Path(filename).absolute(), typing.get_type_hints(fn, include_extras=True)
    for name, value in given.items():
        if isinstance(value, (str, Path)) and str(value) and Path(value).absolute() in (path, *path.parents):
            argument = any(isinstance(m, typer.models.ArgumentInfo) for m in getattr(hints.get(name), "__metadata__", ()))
            return name.upper() if argument else "--" + name.replace("_", "-")
    return None


def literal_help(text: str) -> str:
    """Help printed as written: typer's rich markup (its default when rich is installed) eats "[default: ...]"."""
    if typer.core.DEFAULT_MARKUP_MODE != "rich":
        return text
    from rich.markup import escape

    return escape(text)
