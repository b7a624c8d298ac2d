"""Which published rows a COCO evaluation reproduces: the published caption list (pinned by its sha256), the
generation precision and 8-bit rounding, and DMD2's SDXL protocol chosen for SDXL models."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from test_eval_coco import StandInInception, cache, independent_fid, run, tiny_clip  # noqa: F401 - fixtures used by name
from test_export import make_run
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.errors import UserError
from emd_t2i.evaluation import captions as coco
from emd_t2i.evaluation import fid
from emd_t2i.evaluation.captions import COCO_30K, load_caption_list
from emd_t2i.evaluation.coco import Extractors, evaluate_coco
from emd_t2i.evaluation.generate import generate_missing, image_path, open_source
from emd_t2i.evaluation.protocols import PROTOCOLS, resolve_precision, resolve_protocol, resolve_rounding
from emd_t2i.export.writer import export_run

# ---------------------------------------------------------------------------------------------------------
# The published caption list
# ---------------------------------------------------------------------------------------------------------

def _published_stand_in(folder, monkeypatch):
    """A small file in the published list's format (stray whitespace, a blank line, CRLF), its sha256 pinned in
    place of the real list's: no caption of the real list is in this repository."""
    path = folder / "captions_coco14_test.txt"
    path.write_bytes(b"A man riding a horse.\n  Two dogs  on a couch. \r\n\nA red bus\t\nA bowl of fruit.\n")
    monkeypatch.setattr(coco, "PUBLISHED_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def test_the_published_list_is_verified_when_prepared_and_when_used(tmp_path, cache, monkeypatch):  # noqa: F811
    """`coco2014-val-30k` is DMD2's / SiD-LSG's list: prepared from the user's copy, read as their code reads it
    (stripped lines, blank ones skipped), refused when the file or the prepared copy is not it."""
    wrong = tmp_path / "mine.txt"
    wrong.write_text("A man riding a horse.\n")
    result = CliRunner().invoke(app, ["coco", "captions", str(wrong)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "captions_coco14_test.txt" in result.output and "github.com/tianweiy/DMD2" in result.output
    with pytest.raises(UserError, match="captions_coco14_test.txt"):
        load_caption_list(COCO_30K)  # not prepared yet

    source = _published_stand_in(tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["coco", "captions", str(source)])
    assert result.exit_code == 0, result.output
    assert "--prompts coco2014-val-30k" in result.output
    listing = load_caption_list(COCO_30K)
    expected = ["A man riding a horse.", "Two dogs  on a couch.", "A red bus", "A bowl of fruit."]
    assert listing.captions == expected
    assert listing.info["name"] == COCO_30K and listing.info["verified"] and listing.info["n"] == 4
    assert listing.info["file_sha256"] == coco.PUBLISHED_SHA256
    assert load_caption_list(str(source)).info["name"] == COCO_30K  # the file itself is recognised too
    result = CliRunner().invoke(app, ["coco", "captions", str(source), "--n", "2"])
    assert result.exit_code == 2 and "--n" in result.output

    prepared = cache / "captions" / "coco2014-val-30k.txt"
    prepared.write_bytes(prepared.read_bytes().replace(b"horse", b"horses"))
    with pytest.raises(UserError, match="not the published COCO-2014 30K caption list"):
        load_caption_list(COCO_30K)  # verified on every use


# ---------------------------------------------------------------------------------------------------------
# Precision and rounding
# ---------------------------------------------------------------------------------------------------------


def test_precision_and_rounding_follow_the_protocol_unless_given():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    default, sdxl = resolve_protocol("auto", False), resolve_protocol("auto", True)
    assert (default.name, sdxl.name) == ("coco2014-30k-256", "dmd2-sdxl-coco10k")
    assert resolve_precision("auto", default, cuda) == torch.float16  # SiD-LSG generates in fp16
    assert resolve_precision("auto", default, cpu) == torch.float32
    assert resolve_precision("auto", sdxl, cuda) == torch.float32  # DMD2 generates in fp32
    assert resolve_precision("bf16", sdxl, cuda) == torch.bfloat16
    assert (resolve_rounding("auto", default), resolve_rounding("auto", sdxl)) == ("round", "truncate")
    for resolve, bad in ((lambda v: resolve_precision(v, default, cpu), "fp8"),
                         (lambda v: resolve_rounding(v, default), "ceil"), (lambda v: resolve_protocol(v, False), "x")):
        with pytest.raises(UserError, match="must be auto or one of"):
            resolve(bad)


def test_truncated_images_are_the_rounded_ones_floored(run, tiny_teacher_dir, tmp_path):  # noqa: F811
    """"truncate" (DMD2) and "round" (SiD-LSG) make the same picture one 8-bit level apart at most, for the one-step
    export and for the teacher through diffusers."""
    captions = ["a red fox", "a lighthouse at dusk"]
    for model, steps in ((run / "export", None), (str(tiny_teacher_dir), 2)):
        arrays = {}
        for rounding in ("round", "truncate"):
            source = open_source(model, steps=steps, guidance=None, scheduler="teacher", device="cpu",
                                 dtype=torch.float32, rounding=rounding)
            assert source.info["rounding"] == rounding
            generate_missing(source, captions, tmp_path / f"{steps}-{rounding}", seed=3, batch_size=2, progress=False)
            arrays[rounding] = np.stack([np.asarray(Image.open(image_path(tmp_path / f"{steps}-{rounding}", i)),
                                                    dtype=int) for i in range(2)])
        difference = arrays["round"] - arrays["truncate"]
        assert set(np.unique(difference)) == {0, 1}, model


# ---------------------------------------------------------------------------------------------------------
# DMD2's SDXL protocol, chosen automatically for an SDXL export
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_reference_dir(tmp_path_factory):
    """Real-image stand-ins, some larger than the 299 px patch on both sides (so the patch is really cut)."""
    folder = tmp_path_factory.mktemp("coco10k")
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(320, 300), (420, 310), (301, 360), (40, 30), (300, 300), (350, 330)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_an_sdxl_export_is_scored_by_dmd2s_sdxl_protocol(tmp_path, tiny_sdxl_teacher_dir, sdxl_reference_dir):
    """FID on the 512 px crop, patch FID on the centre 299 px (as DMD2's main/coco_eval/coco_evaluator.py cuts them,
    recomputed here with torchvision), fp32 and truncation, all recorded; resuming with other settings is refused."""
    export = export_run(make_run(tmp_path / "sdxl", tiny_sdxl_teacher_dir), formats=("pipeline",))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse at dusk\na bowl of fruit\na cat\n")
    inception = StandInInception()
    kwargs = {"prompts": str(prompts), "reference": sdxl_reference_dir, "output": tmp_path / "eval", "batch_size": 2,
              "device": "cpu", "speed_teacher_steps": 0, "speed_repeats": 1, "num_workers": 0, "progress": False,
              "extractors": Extractors(fid.Extractor("stand-in inception", inception), tiny_clip())}
    metrics = evaluate_coco(export, **kwargs)
    assert metrics["protocol"] == PROTOCOLS["dmd2-sdxl-coco10k"].info()
    assert (metrics["precision"], metrics["rounding"]) == ("float32", "truncate")
    assert metrics["model"]["rounding"] == "truncate"
    assert "512x512" in metrics["fid_details"]["transform"] and "299x299" in metrics["patch_fid_details"]["transform"]
    assert "256x256" in metrics["clip_details"]["transform"]

    files = [image_path(tmp_path / "eval" / "images", i) for i in range(4)]
    reference = sorted(sdxl_reference_dir.glob("*.png"))
    crop512 = lambda im: TF.center_crop(im, min(im.size)).resize((512, 512), Image.LANCZOS)
    patch = lambda im: TF.center_crop(im, 299) if min(im.size) >= 299 else im
    assert metrics["fid"] == pytest.approx(independent_fid(files, reference, inception, crop512), abs=1e-3)
    assert metrics["patch_fid"] == pytest.approx(independent_fid(files, reference, inception, patch), abs=1e-3)
    assert metrics["patch_fid"] != metrics["fid"]

    with pytest.raises(UserError, match="rounding 'truncate' -> 'round'"):
        evaluate_coco(export, **kwargs, rounding="round")
    plain = evaluate_coco(export, **{**kwargs, "output": tmp_path / "plain"}, protocol="coco2014-30k-256")
    assert "patch_fid" not in plain and "256x256" in plain["fid_details"]["transform"]
    assert (plain["precision"], plain["rounding"]) == ("float32", "round")


def test_a_bad_protocol_flag_is_one_line(run, tmp_path):  # noqa: F811
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = CliRunner().invoke(app, ["eval", "--model", str(run / "export"), "--prompts", str(prompts),
                                      "--reference", str(tmp_path), "--output", str(tmp_path / "o"), "--device", "cpu",
                                      "--protocol", "fid-50k"])
    assert result.exit_code == 2 and "--protocol" in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["eval", "--model", str(run / "export"), "--rounding", "truncate"])
    assert result.exit_code == 2 and "--rounding" in result.output  # a COCO flag without --prompts


def test_a_pickled_caption_list_loads_as_dmd2_reads_it_and_runs_nothing(tmp_path):
    """DMD2 ships its SDXL list as coco10k/all_prompts.pkl: a pickled list of str (None read as "")."""
    import pickle

    path = tmp_path / "all_prompts.pkl"
    path.write_bytes(pickle.dumps([" A cat. ", None, "Two dogs"]))
    listing = load_caption_list(str(path))
    assert listing.captions == [" A cat. ", "", "Two dogs"] and len(listing.info["file_sha256"]) == 64
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps([print]))  # would import builtins.print when unpickled
    with pytest.raises(UserError, match="builtins.print"):
        load_caption_list(str(hostile))
    other = tmp_path / "dict.pkl"
    other.write_bytes(pickle.dumps({"a": "b"}))
    with pytest.raises(UserError, match="not a list of strings"):
        load_caption_list(str(other))
