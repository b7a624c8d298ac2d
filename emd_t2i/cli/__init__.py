"""The `emd-t2i` command line: a thin Typer shell over the library's functions, one module per command group."""

from __future__ import annotations

import sys

import typer

from emd_t2i.cli import distilling, evaluating, exporting
from emd_t2i.cli.data import coco_app, prompts_app
from emd_t2i.cli.toy import toy_app

app = typer.Typer(
    help="Distill a Stable Diffusion teacher into a one-step generator with EM Distillation (EMD).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command(epilog=distilling.DISTILL_EXAMPLE)(distilling.distill)
app.command()(distilling.teachers)
app.add_typer(toy_app, name="toy")
app.command(epilog=exporting.EXPORT_EXAMPLE)(exporting.export)
app.command(epilog=exporting.SAMPLE_EXAMPLE)(exporting.sample)
app.command("eval", epilog=evaluating.EVAL_EXAMPLES)(evaluating.evaluate)
app.add_typer(prompts_app, name="prompts")
app.add_typer(coco_app, name="coco")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
