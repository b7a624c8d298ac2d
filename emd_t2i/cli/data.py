"""`emd-t2i prompts ...` and `emd-t2i coco ...`: the data a run or an evaluation reads, prepared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emd_t2i.cli.common import file_flag, folder_flag, literal_help, user_errors
from emd_t2i.errors import UserError

prompts_app = typer.Typer(help="Prompt sources and their text embeddings: encode once, reuse across runs and ranks.",
                          no_args_is_help=True)


@prompts_app.command("encode", epilog="Example: emd-t2i prompts encode --teacher sd-1.5 --prompts hf:owner/captions "
                     "--output embeddings/sd15-captions")
@user_errors
def prompts_encode(
    teacher: Annotated[str, typer.Option(help="registry name, diffusers folder or hub id whose tokenizer and text "
                                              "encoder encode the prompts")],
    prompts: Annotated[str, typer.Option(help="prompt source, as for distill: file, folder, glob or hf:owner/name")],
    output: Annotated[Path, typer.Option(help="store folder to write (run the same command again to resume)")],
    prompt_column: Annotated[str | None, typer.Option(help="column of a jsonl/csv/dataset source [default: the "
                                                           "first of prompt, text, caption]")] = None,
    split: Annotated[str, typer.Option(help="split of a Hugging Face dataset")] = "train",
    batch_size: Annotated[int, typer.Option(help="prompts per text-encoder call")] = 256,
    shard_size: Annotated[int, typer.Option(help="prompts per safetensors shard (the unit of resuming)")] = 10_000,
    dtype: Annotated[str, typer.Option(help="stored precision: float16 | bfloat16 | float32 (encoding is float32)")]
        = "float16",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
):
    """Encode every prompt of a source once into safetensors shards that later runs and all their ranks read."""
    import torch

    from emd_t2i.data.prompts import open_prompts
    from emd_t2i.data.store import check_encode_settings, encode_store
    from emd_t2i.models.teachers import load_text_encoder

    check_encode_settings(batch_size, shard_size, dtype)
    folder_flag("--output", output)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is visible; use --device cpu")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    source = open_prompts(prompts, column=prompt_column, split=split)
    tokenizer, text_encoder, teacher_source = load_text_encoder(teacher, device=device)
    summary = encode_store(tokenizer, text_encoder, source, output, teacher=teacher, teacher_source=teacher_source,
                           batch_size=batch_size, shard_size=shard_size, dtype=dtype, progress=True)
    typer.echo(f"{summary.count} prompts in {summary.shards} shards at {summary.path} ({summary.encoded_shards} "
               f"encoded now, {summary.kept_shards} kept from before)")


@prompts_app.command("info")
@user_errors
def prompts_info(
    source: Annotated[str, typer.Argument(help="a prompt source (as for --prompts) or an embedding store folder")],
    prompt_column: Annotated[str | None, typer.Option(help="column of a jsonl/csv/dataset source")] = None,
    split: Annotated[str, typer.Option(help="split of a Hugging Face dataset")] = "train",
    show: Annotated[int, typer.Option(help="prompts to show, evenly spaced through the source")] = 5,
):
    """Count the prompts of a source and show a few, or describe an embedding store."""
    from emd_t2i.data.prompts import distinct_spread, open_prompts
    from emd_t2i.data.store import MANIFEST, read_manifest

    if (Path(source) / MANIFEST).is_file():
        m = read_manifest(Path(source))
        typer.echo(f"embedding store: {m['count']} prompts from {m['prompts']['source']}, teacher {m['teacher']}, "
                   f"{m['dtype']} {'x'.join(map(str, m['shape']))}, {len(m['shards'])} shards")
        return
    prompts = open_prompts(source, column=prompt_column, split=split)
    typer.echo(f"{len(prompts)} prompts in {source}")
    for prompt in distinct_spread(prompts, max(show, 0)):
        typer.echo(f"  {prompt}")


# ---------------------------------------------------------------- commands built in other modules


coco_app = typer.Typer(help="The COCO-2014 protocol's inputs: the caption list and the FID reference statistics.",
                       no_args_is_help=True)


@coco_app.command("captions", epilog="Examples: emd-t2i coco captions captions_coco14_test.txt (the published list, "
                  "for --prompts coco2014-val-30k); emd-t2i coco captions annotations/captions_val2014.json (this "
                  "project's seeded draw, coco2014-val-30k-emd)")
@user_errors
def coco_captions(
    source: Annotated[str, typer.Argument(help="the published list: DMD2's main/coco_eval/captions_coco14_test.txt or SiD-LSG's prompts/captions.txt (the same file, checked by its sha256); or captions_val2014.json (annotations_trainval2014.zip, cocodataset.org) or hf:owner/name for a seeded draw")],
    output: Annotated[Path | None, typer.Option(help=literal_help("list file to write [default: the cache, where --prompts NAME finds it]"))] = None,
    n: Annotated[int | None, typer.Option(help=literal_help("a draw from annotations: captions, one per distinct image [default: 30000]"))] = None,
    seed: Annotated[int | None, typer.Option(help=literal_help("a draw from annotations: seed of the selection, recorded in the list [default: 0]"))] = None,
    split: Annotated[str, typer.Option(help="split of an hf: dataset")] = "validation",
    caption_column: Annotated[str | None, typer.Option(help=literal_help("caption column of an hf: dataset [default: caption, captions, sentences or text]"))] = None,
    image_column: Annotated[str | None, typer.Option(help=literal_help("image id column of an hf: dataset [default: image_id, cocoid, imgid or id]"))] = None,
):
    """Prepare an evaluation caption list: the published COCO-2014 30K list (the default protocol's, verified by its
    sha256), or a seeded draw from COCO-2014 val annotations (n images, one caption each)."""
    from emd_t2i.evaluation.captions import (
        COCO_30K,
        DEFAULT_CAPTION_SEED,
        DEFAULT_CAPTIONS,
        list_name,
        prepare_captions,
    )

    file_flag("--output", output)
    path = prepare_captions(source, output, n=n, seed=seed, split=split, caption_column=caption_column,
                            image_column=image_column)
    if Path(source).suffix.lower() == ".txt":
        name = COCO_30K
    else:
        name = list_name(DEFAULT_CAPTIONS if n is None else n, DEFAULT_CAPTION_SEED if seed is None else seed)
    typer.echo(f"wrote {path}; evaluate with --prompts {path if output else name}")


@coco_app.command("reference", epilog="Example: emd-t2i coco reference coco/val2014 --output coco-val2014-256.npz")
@user_errors
def coco_reference(
    images: Annotated[Path, typer.Argument(help="the COCO val2014 image folder (or its zip)")],
    output: Annotated[Path | None, typer.Option(help=literal_help("statistics .npz [default: the cache, where --reference FOLDER finds it]"))] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    batch_size: Annotated[int, typer.Option(help="images per Inception batch")] = 32,
    inception_weights: Annotated[str | None, typer.Option(help=literal_help("clean-fid's inception-2015-12-05.pt [default: the emd-t2i cache or /tmp]"))] = None,
):
    """Compute the FID reference statistics of the real images once (256 px crop, clean-fid Inception)."""
    import os

    import torch

    from emd_t2i.evaluation.fid import compute_reference, load_inception, reference_images

    if output is not None and output.suffix != ".npz":
        raise UserError(f"--output {output} must end in .npz")
    file_flag("--output", output)
    reference_images(images, flag="IMAGES")  # the folder first: a mistake there should not wait for the weights
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _, path = compute_reference(images, load_inception(device, inception_weights), device, output=output,
                                batch_size=batch_size, num_workers=min(8, os.cpu_count() or 1))
    typer.echo(f"wrote {path}; evaluate with --reference {path}")
