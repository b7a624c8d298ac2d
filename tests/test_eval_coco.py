"""The COCO-2014 protocol end to end on tiny models: caption list, resumable generation, FID and CLIP score through
the real code (clean-fid, open_clip) with small stand-in networks, metrics.json, the model card."""

from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from cleanfid.fid import frechet_distance
from cleanfid.resize import build_resizer
from PIL import Image
from test_export import make_run
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.errors import UserError
from emd_t2i.evaluation import coco as evaluate_module
from emd_t2i.evaluation import fid
from emd_t2i.evaluation import toy as toy_evaluation
from emd_t2i.evaluation.captions import COCO_30K, EMD_30K, list_name, load_caption_list, prepare_captions
from emd_t2i.evaluation.clip import CLIP_PREFIX, ClipScorer, check_clip_weights
from emd_t2i.evaluation.coco import Extractors, evaluate_coco
from emd_t2i.evaluation.generate import generate_missing, image_path, open_source
from emd_t2i.export.layout import FACTS_FILE
from emd_t2i.export.sample import sample
from emd_t2i.export.writer import export_run

SEED = 10
FEATURES = 4


# ---------------------------------------------------------------------------------------------------------
# Stand-ins for Inception and ViT-g-14: the same interfaces, a few thousand random weights
# ---------------------------------------------------------------------------------------------------------


class StandInInception(torch.nn.Module):
    """(B, 3, 299, 299) in [0, 255] -> (B, 4): a fixed random projection of 4x4-pooled pixels; counts images."""

    def __init__(self):
        super().__init__()
        self.projection = torch.randn(3 * 4 * 4, FEATURES, generator=torch.Generator().manual_seed(0))
        self.seen = 0

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299)
        self.seen += len(x)
        return torch.nn.functional.adaptive_avg_pool2d(x / 255, 4).flatten(1) @ self.projection


def tiny_clip() -> ClipScorer:
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                                  image_size=32),
                           text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    cfg = open_clip.get_pretrained_cfg("ViT-g-14", "laion2b_s12b_b42k")
    preprocess = open_clip.image_transform(32, is_train=False, mean=cfg["mean"], std=cfg["std"])
    return ClipScorer(model, preprocess, open_clip.get_tokenizer("ViT-g-14"), "cpu", "stand-in clip")


def reference_transform(image: Image.Image) -> Image.Image:
    """The transform as DMD2 (main/coco_eval/coco_evaluator.py) and GigaGAN (evaluation/) write it."""
    image = TF.center_crop(image, min(image.size))  # their CenterCropLongEdge
    return image.resize((256, 256), Image.LANCZOS)


# ---------------------------------------------------------------------------------------------------------
# Fixtures: an annotation file, real-image folder, a tiny export
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMD_T2I_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "CLEANFID_DIR", tmp_path / "cleanfid")
    return tmp_path / "cache"


def annotation_file(folder, images: int = 10):
    """captions_val2014.json in miniature: image i has 1 + i % 3 captions, some with stray whitespace."""
    annotations, next_id = [], 100
    for i in range(images):
        for k in range(1 + i % 3):
            annotations.append({"image_id": 500 + i, "id": next_id, "caption": f"  a photo of thing {i}\n take {k} "})
            next_id += 1
    data = {"images": [{"id": 500 + i, "file_name": f"COCO_val2014_{500 + i:012d}.jpg"} for i in range(images)],
            "annotations": annotations[::-1]}
    path = folder / "captions_val2014.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """Twelve real-image stand-ins of assorted sizes and aspect ratios, as JPEGs (as COCO ships them)."""
    folder = tmp_path_factory.mktemp("val2014")
    rng = np.random.default_rng(0)
    for i in range(12):
        w, h = int(rng.integers(24, 60)), int(rng.integers(24, 60))
        ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, 3)
        pixels = (ramp + rng.normal(0, 30, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"COCO_val2014_{i:012d}.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher_dir):
    run = make_run(tmp_path_factory.mktemp("coco"), tiny_teacher_dir)
    export_run(run, formats=("pipeline",))
    return run


# ---------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------


def test_caption_list_from_the_annotation_file(tmp_path, cache):
    source = annotation_file(tmp_path)
    result = CliRunner().invoke(app, ["coco", "captions", str(source), "--n", "6", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "--prompts coco2014-val-6-seed3" in result.output
    listing = load_caption_list("coco2014-val-6-seed3")  # found by name in the cache
    document = json.loads((cache / "captions" / "coco2014-val-6-seed3.json").read_text())
    assert (listing.info["seed"], listing.info["n"], listing.info["images_in_source"]) == (3, 6, 10)
    assert listing.info["source"] == "captions_val2014.json" and len(listing.info["source_sha256"]) == 64
    ids = [c["image_id"] for c in document["captions"]]
    assert len(set(ids)) == 6  # one caption per distinct image
    for entry in document["captions"]:
        i = entry["image_id"] - 500
        assert entry["caption"] in [f"a photo of thing {i} take {k}" for k in range(1 + i % 3)]  # whitespace collapsed
        assert entry["file_name"] == f"COCO_val2014_{entry['image_id']:012d}.jpg"
    assert listing.captions == [c["caption"] for c in document["captions"]]

    again = load_caption_list(str(prepare_captions(str(source), tmp_path / "again.json", n=6, seed=3)))
    shorter = load_caption_list(str(prepare_captions(str(source), tmp_path / "short.json", n=4, seed=3)))
    other = load_caption_list(str(prepare_captions(str(source), tmp_path / "other.json", n=6, seed=4)))
    assert again.captions == listing.captions and shorter.captions == listing.captions[:4]
    assert other.captions != listing.captions
    with pytest.raises(UserError, match="emd-t2i coco captions"):
        load_caption_list(COCO_30K)  # the published list is not prepared by a draw
    assert list_name(30_000, 0) == EMD_30K != COCO_30K
    result = CliRunner().invoke(app, ["coco", "captions", str(source), "--n", "11"])
    assert result.exit_code == 2 and "--n must be between 1 and the 10" in result.output


def test_caption_list_from_a_hugging_face_dataset(tmp_path, monkeypatch):
    rows = [{"cocoid": 7 + i, "sentences": [f"cat {i} a", f"cat {i} b"]} for i in range(5)]

    def load_dataset(name, split):
        found = type("Rows", (list,), {})(rows)
        found.column_names = ["cocoid", "sentences"]
        return found

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    listing = load_caption_list(str(prepare_captions("hf:someone/coco-2014-val", tmp_path / "hf.json", n=3, seed=1)))
    assert len(listing.captions) == 3 and len({c.split()[1] for c in listing.captions}) == 3
    assert listing.info["source"] == "hf:someone/coco-2014-val (split validation)"
    with pytest.raises(UserError, match="--caption-column"):
        prepare_captions("hf:someone/coco-2014-val", tmp_path / "x.json", n=3, caption_column="text")


# ---------------------------------------------------------------------------------------------------------
# The transform and the CLIP text
# ---------------------------------------------------------------------------------------------------------


def test_crop_and_lanczos_match_the_reference_transform():
    """Pixel-equal to torchvision's center_crop + PIL Lanczos on noise, including the half-pixel crops where
    rounding matters ((643 - 480) / 2 = 81.5 -> 82, as torchvision rounds; SiD's `// 2` would take 81)."""
    rng = np.random.default_rng(1)
    for w, h in [(640, 480), (480, 640), (641, 480), (480, 643), (300, 300), (257, 1000), (512, 512)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        expected = np.asarray(reference_transform(image))
        assert np.array_equal(np.asarray(fid.center_crop_resize(image)), expected), (w, h)
        assert np.array_equal(fid.transform_array(np.asarray(image)), expected)  # clean-fid's hook


def test_clip_text_is_the_reference_token_splice():
    """tokenize("A photo depicts " + caption) gives the ids DMD2 / GigaGAN build by splicing the prefix's three
    tokens after the start token, truncated to 77 with the end token last."""
    tokenizer = open_clip.get_tokenizer("ViT-g-14")
    captions = ["A cat on a mat.", " ".join(["a very long caption"] * 30)]
    tokens = tokenizer(captions)
    prefix = tokenizer([CLIP_PREFIX])[:, 1:4].expand(len(captions), -1)
    spliced = torch.cat([tokens[:, :1], prefix, tokens[:, 1:]], dim=1)[:, :77]
    last = spliced[:, 76:77].clone()
    last[last > 0] = 49407
    spliced = torch.cat([spliced[:, :76], last], dim=1)
    assert torch.equal(tokenizer([CLIP_PREFIX + c for c in captions]), spliced)


# ---------------------------------------------------------------------------------------------------------
# The whole path
# ---------------------------------------------------------------------------------------------------------


def independent_fid(files, reference_files, model, transform=None) -> float:
    """FID recomputed outside emd_t2i: the protocol's transform (by default the 256 px crop, `reference_transform`),
    clean-fid's resize, the stand-in network, the Frechet distance."""
    resize, transform = build_resizer("clean"), transform or reference_transform

    def stats(paths):
        feats = []
        for p in paths:
            with Image.open(p) as image:
                x = resize(np.asarray(transform(image.convert("RGB"))))
            feats.append(model(torch.from_numpy(x).permute(2, 0, 1)[None].float()).numpy())
        feats = np.concatenate(feats)
        return feats.mean(0), np.cov(feats, rowvar=False)

    return float(frechet_distance(*stats(files), *stats(reference_files)))


def _independent_clip(files, captions, scorer) -> float:
    sims = []
    for f, caption in zip(files, captions):
        with Image.open(f) as image:
            pixels = scorer.preprocess(reference_transform(image.convert("RGB")))[None]
        with torch.no_grad():
            a = scorer.model.encode_image(pixels)
            b = scorer.model.encode_text(scorer.tokenizer(["A photo depicts " + caption]))
        sims.append(float(torch.nn.functional.cosine_similarity(a, b)))
    return float(np.mean(sims))


def test_the_whole_path_resumes_and_writes_metrics(run, reference_dir, tmp_path, cache):
    export = run / "export"
    assert CliRunner().invoke(app, ["coco", "captions", str(annotation_file(tmp_path)), "--n", "8"]).exit_code == 0
    inception, clip = StandInInception(), tiny_clip()
    stand_ins = Extractors(fid.Extractor("stand-in inception", inception), clip)
    out = tmp_path / "eval"
    kwargs = {"prompts": "coco2014-val-8-seed0", "reference": reference_dir, "output": out, "seed": SEED,
              "batch_size": 3, "device": "cpu", "speed_teacher_steps": 2, "speed_repeats": 1, "num_workers": 0,
              "extractors": stand_ins, "progress": False}
    metrics = evaluate_coco(export, **kwargs)
    captions = load_caption_list("coco2014-val-8-seed0").captions
    files = [image_path(out / "images", i) for i in range(8)]

    # image i: caption i, seed SEED + i, the same picture `emd-t2i sample` makes
    for i in (0, 5):
        assert np.array_equal(np.asarray(Image.open(files[i])),
                              np.asarray(sample(captions[i], export, seed=SEED + i).images[0]))
        assert Image.open(files[i]).text["caption"] == captions[i]
    assert (out / "captions.txt").read_text().splitlines() == captions

    # the numbers, recomputed independently
    reference_files = sorted(reference_dir.glob("*.jpg"))
    assert metrics["fid"] == pytest.approx(independent_fid(files, reference_files, inception), abs=1e-3)
    assert metrics["clip_score"] == pytest.approx(_independent_clip(files, captions, clip), abs=1e-4)
    assert metrics["fid"] > 0 and -1 <= metrics["clip_score"] <= 1

    # every setting
    assert metrics["model"]["kind"] == "one-step export" and metrics["model"]["steps"] == 1
    assert (metrics["protocol"]["name"], metrics["precision"], metrics["rounding"]) == ("coco2014-30k-256", "float32",
                                                                                        "round")
    assert metrics["model"]["t_star"] == 999 and metrics["model"]["resolution"] == 16
    assert (metrics["captions"]["used"], metrics["captions"]["seed"], metrics["captions"]["name"]) == \
        (8, 0, "coco2014-val-8-seed0")
    assert metrics["images"]["count"] == 8 and metrics["images"]["seed"] == SEED
    assert metrics["images"]["generation_main_process"]["generated"] == 8
    ref = metrics["fid_details"]["reference"]
    assert ref["count"] == 12 and ref["extractor"] == "stand-in inception"
    assert metrics["fid_details"]["images"] == 8 and metrics["clip_details"]["count"] == 8
    assert metrics["clip_details"]["prefix"] == "A photo depicts "
    assert metrics["versions"]["clean-fid"] and metrics["versions"]["open_clip_torch"]
    speed = metrics["speed"]
    assert speed["one_step"]["latency_s"] > 0 and speed["teacher"]["steps"] == 2
    assert speed["one_step_speedup"]["latency"] > 0 and speed["hardware"]["processes"] == 1
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert json.loads((run / "metrics.json").read_text()) == metrics  # where the model card looks

    # resume: only the missing PNGs are rendered, the same pixels; the reference statistics come from the cache
    before = {f: (f.stat().st_mtime_ns, np.asarray(Image.open(f))) for f in files}
    for i in (2, 6):
        files[i].unlink()
    inception.seen = 0
    again = evaluate_coco(export, **kwargs)
    assert (again["images"]["generation_main_process"]["generated"],
            again["images"]["generation_main_process"]["reused"]) == (2, 6)
    for i, f in enumerate(files):
        assert np.array_equal(np.asarray(Image.open(f)), before[f][1])
        assert (f.stat().st_mtime_ns == before[f][0]) == (i not in (2, 6))
    assert inception.seen == 8  # the generated images only: the 12 reference images were not read again
    assert again["fid"] == metrics["fid"] and again["clip_score"] == metrics["clip_score"]
    with pytest.raises(UserError, match="other settings.*seed 10 -> 11"):
        evaluate_coco(export, **{**kwargs, "seed": SEED + 1})

    # the model card shows it
    card = (export_run(run, output=tmp_path / "card", formats=("lora",)) / "README.md").read_text()
    assert f"| FID | {metrics['fid']} |" in card and "COCO" in card


def test_the_teacher_row_comes_from_plain_diffusers(run, tiny_teacher_dir, tmp_path):
    """--model TEACHER --steps S: the teacher's own scheduler through diffusers, caption i with seed + i."""
    from diffusers import StableDiffusionPipeline

    captions = ["a red fox", "a lighthouse at dusk", "a bowl of fruit"]
    source = open_source(str(tiny_teacher_dir), steps=2, guidance=2.0, scheduler="teacher", device="cpu",
                         dtype=torch.float32)
    assert (source.info["kind"], source.info["scheduler"]) == ("teacher", "PNDMScheduler")
    generate_missing(source, captions, tmp_path, seed=4, batch_size=2, progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    pipe.set_progress_bar_config(disable=True)
    for i, caption in enumerate(captions):
        expected = pipe(caption, num_inference_steps=2, guidance_scale=2.0,
                        generator=torch.Generator("cpu").manual_seed(4 + i)).images[0]
        assert np.array_equal(np.asarray(Image.open(image_path(tmp_path, i))), np.asarray(expected))
    with pytest.raises(UserError, match="--model .*teacher"):
        open_source(run / "export", steps=4, guidance=None, scheduler="teacher", device="cpu", dtype=torch.float32)
    with pytest.raises(UserError, match="--scheduler"):
        open_source(str(tiny_teacher_dir), steps=2, guidance=None, scheduler="euler", device="cpu",
                    dtype=torch.float32)


def test_processes_split_the_captions_and_resume_by_index(tmp_path):
    """Under `accelerate launch` each process takes every n-th caption: together each index once, whatever was
    already there, and the same pictures as one process (the seed is the caption's, not the process's)."""

    class Source:
        info, device = {}, torch.device("cpu")

        def __init__(self):
            self.seeds = []

        def __call__(self, prompts, seeds):
            self.seeds += seeds
            return [Image.new("RGB", (4, 4), (s, 2 * s, 0)) for s in seeds]

    captions = [f"caption {i}" for i in range(7)]
    single = Source()
    generate_missing(single, captions, tmp_path / "one", seed=0, batch_size=2, progress=False)
    split = tmp_path / "two"
    split.mkdir()
    shutil.copy(image_path(tmp_path / "one", 3), image_path(split, 3))  # process 1 had rendered one before a crash
    workers = [Source(), Source()]
    for rank, worker in enumerate(workers):
        generate_missing(worker, captions, split, seed=0, batch_size=2, process_index=rank, num_processes=2,
                         progress=False)
    assert workers[0].seeds == [0, 2, 4, 6] and workers[1].seeds == [1, 5]
    for i in range(7):
        assert np.array_equal(np.asarray(Image.open(image_path(split, i))),
                              np.asarray(Image.open(image_path(tmp_path / "one", i))))
    assert sorted(p.name for p in split.iterdir()) == [f"{i:06d}.png" for i in range(7)]  # no temporary files


# ---------------------------------------------------------------------------------------------------------
# Errors and the command line
# ---------------------------------------------------------------------------------------------------------


def test_missing_weights_say_which_file_where_and_how(tmp_path, cache):
    with pytest.raises(UserError) as err:
        fid.inception_weights()
    message = str(err.value)
    assert "inception-2015-12-05.pt" in message and str(cache) in message and "--inception-weights" in message
    assert "HF_HUB_OFFLINE" in message and fid.INCEPTION_URL in message
    with pytest.raises(UserError, match="--inception-weights"):
        fid.inception_weights(tmp_path / "weights.pt")
    with pytest.raises(UserError) as err:
        check_clip_weights()
    message = str(err.value)
    assert "open_clip_pytorch_model.bin" in message and "laion/CLIP-ViT-g-14-laion2B-s12B-b42K" in message
    assert "--clip-weights" in message and "cache" in message
    with pytest.raises(UserError, match="--clip-weights"):
        check_clip_weights(tmp_path / "missing.bin")


def test_the_command_line(run, reference_dir, tmp_path, monkeypatch):
    """`emd-t2i eval --prompts` runs the protocol; without --prompts the toy route stays; mistakes exit 2."""
    monkeypatch.setattr(fid, "load_inception", lambda device, weights=None: fid.Extractor("s", StandInInception()))
    monkeypatch.setattr(fid, "inception_weights", lambda weights=None: None)
    monkeypatch.setattr(evaluate_module, "load_clip", lambda device, weights=None: tiny_clip())
    monkeypatch.setattr(evaluate_module, "check_clip_weights", lambda weights=None: None)
    prompts = tmp_path / "captions.txt"
    prompts.write_text("a red fox\na lighthouse\na bowl of fruit\n")
    runner = CliRunner()
    out = tmp_path / "eval"
    args = ["eval", "--model", str(run / "export"), "--prompts", str(prompts), "--reference", str(reference_dir),
            "--device", "cpu", "--speed-teacher-steps", "0"]
    result = runner.invoke(app, args + ["--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "FID" in result.output and "metrics.json" in result.output
    assert json.loads((out / "metrics.json").read_text())["captions"]["source"] == str(prompts)

    result = runner.invoke(app, args)  # no --output
    assert result.exit_code == 2 and "--output" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["eval", "--model", str(run / "export"), "--reference", str(reference_dir)])
    assert result.exit_code == 2 and "--prompts" in result.output

    result = runner.invoke(app, ["eval", "--model", str(run / "export")])  # an SD export without --prompts
    assert result.exit_code == 2 and "--prompts coco2014-val-30k" in result.output
    toy = shutil.copytree(run / "export", tmp_path / "toy" / "export")
    facts = json.loads((toy / FACTS_FILE).read_text())
    (toy / FACTS_FILE).write_text(json.dumps({**facts, "teacher": "toy"}))
    monkeypatch.setattr(toy_evaluation, "toy_report", lambda generate, n, teacher: {"prompts": n,
                                                                                    "teacher": callable(teacher)})
    result = runner.invoke(app, ["eval", "--model", str(toy), "--n", "12"])
    assert result.exit_code == 0, result.output
    report = json.loads((toy / "eval.json").read_text())
    assert report["one_step"] == {"prompts": 12, "teacher": True}  # mode coverage against the 25-step teacher
    assert report["coverage_teacher"] == {"steps": 25, "guidance": facts["guidance_scale"]}
