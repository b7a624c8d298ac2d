"""`emd-t2i toy train-teacher`: a thin wrapper over the toy teacher's training recipe, which lives in a checkout
(tools/train_toy_teacher.py), not in the installed package."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from emd_t2i.cli.common import folder_flag, user_errors
from emd_t2i.errors import UserError

toy_app = typer.Typer(help="The embedded toy teacher: train it, inspect its domain.", no_args_is_help=True)


def recipe_module():
    """tools.train_toy_teacher from the checkout this package was installed from (editable installs)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "tools" / "train_toy_teacher.py").is_file():
        raise UserError("the toy teacher's training recipe is research code kept in the repository "
                        "(tools/train_toy_teacher.py): run this command from an install of a checkout (pip install -e .)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import tools.train_toy_teacher

    return tools.train_toy_teacher


@toy_app.command("train-teacher")
@user_errors
def toy_train_teacher(
    output: Annotated[Path, typer.Option(help="pipeline folder to write (replaced atomically)")] = Path("runs/toy-teacher"),
    checkpoints: Annotated[Path, typer.Option(help="resumable training state")] = Path("runs/toy-teacher-ckpt"),
    unet_steps: Annotated[int | None, typer.Option(help="diffusion-model steps [default: the recipe's]")] = None,
    vae_steps: Annotated[int | None, typer.Option(help="autoencoder steps [default: the recipe's]")] = None,
    num_images: Annotated[int | None, typer.Option(help="size of the fixed training set [default: the recipe's]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="diffusion-model batch [default: the recipe's]")] = None,
    attribute_dropout: Annotated[float | None, typer.Option(help="chance a caption leaves out each attribute "
                                                            "[default: the recipe's]")] = None,
    init_from: Annotated[Path | None, typer.Option(help="a toy teacher folder to fine-tune (keeps its VAE)")] = None,
    export_only: Annotated[bool, typer.Option("--export-only", help="only re-export from the last checkpoint")] = False,
):
    """Train the toy teacher with the project's recipe (resumable: run the same command again to continue)."""
    from dataclasses import replace

    recipes = recipe_module()
    folder_flag("--output", output)
    folder_flag("--checkpoints", checkpoints)
    given = {"unet_steps": unet_steps, "vae_steps": vae_steps, "num_images": num_images, "batch_size": batch_size}
    if any(v is not None and v < 1 for v in given.values()):
        raise UserError("--unet-steps, --vae-steps, --num-images and --batch-size must be >= 1")
    if attribute_dropout is not None and not 0 <= attribute_dropout <= 1:
        raise UserError("--attribute-dropout must be between 0 and 1")
    if init_from is not None and not (init_from / "unet").is_dir():
        raise UserError(f"--init-from {init_from} is not a toy teacher folder (no unet/ in it)")
    given.update(attribute_dropout=attribute_dropout, init_from=None if init_from is None else str(init_from))
    recipe = replace(recipes.TeacherRecipe(), **{k: v for k, v in given.items() if v is not None})
    path = recipes.train_teacher(output, checkpoints, recipe, export_only=export_only)
    typer.echo(f"toy teacher saved to {path}; use it with --teacher {path}")
