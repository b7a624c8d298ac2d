"""A path that names the wrong kind of thing (a file where a folder is expected, or the reverse) ends in one line
naming it, exit code 2, for every command, before any model is loaded or image made."""

import pytest
from typer.testing import CliRunner

from emd_t2i.cli import app

# (command line, what the one line must name); FILE is an existing file, FOLDER an existing folder.
CASES = {
    "distill --output FILE": (["distill", "--teacher", "TEACHER", "--prompts", "PROMPTS", "--output", "FILE",
                               "--device", "cpu"], "--output FILE"),
    "distill --teacher FILE": (["distill", "--teacher", "FILE", "--prompts", "PROMPTS"], "FILE is a file"),
    "distill --prompts FOLDER": (["distill", "--teacher", "TEACHER", "--prompts", "FOLDER"], "FOLDER"),
    "distill --embeddings FILE": (["distill", "--teacher", "TEACHER", "--prompts", "PROMPTS", "--embeddings", "FILE"],
                                  "FILE"),
    "export RUN_DIR=FILE": (["export", "FILE"], "FILE"),
    "export --output FILE": (["export", "FOLDER", "--output", "FILE", "--overwrite"], "FILE"),
    "sample --model FILE": (["sample", "a cat", "--model", "FILE"], "FILE"),
    "sample --prompts FOLDER": (["sample", "--prompts", "FOLDER", "--model", "FOLDER"], "FOLDER"),
    "sample --output FILE": (["sample", "a cat", "--model", "TEACHER", "--output", "FILE"], "--output FILE"),
    "eval --output FILE": (["eval", "--model", "TEACHER", "--prompts", "PROMPTS", "--reference", "FOLDER",
                            "--output", "FILE"], "--output FILE"),
    "eval --reference FILE": (["eval", "--model", "TEACHER", "--prompts", "PROMPTS", "--reference", "FILE",
                               "--output", "FOLDER/eval"], "--reference FILE"),
    "eval --clip-weights FOLDER": (["eval", "--model", "TEACHER", "--prompts", "PROMPTS", "--reference", "FOLDER",
                                    "--output", "FOLDER/eval", "--clip-weights", "FOLDER", "--inception-weights",
                                    "FOLDER/inception-2015-12-05.pt"], "--clip-weights FOLDER"),
    "eval --inception-weights FILE": (["eval", "--model", "TEACHER", "--prompts", "PROMPTS", "--reference", "FOLDER",
                                       "--output", "FOLDER/eval", "--inception-weights", "FILE"],
                                      "--inception-weights FILE"),
    "prompts encode --output FILE": (["prompts", "encode", "--teacher", "TEACHER", "--prompts", "PROMPTS",
                                      "--output", "FILE", "--device", "cpu"], "FILE"),
    "prompts encode --prompts FOLDER": (["prompts", "encode", "--teacher", "TEACHER", "--prompts", "FOLDER",
                                         "--output", "FOLDER/store", "--device", "cpu"], "FOLDER"),
    "prompts info SOURCE=FOLDER": (["prompts", "info", "FOLDER"], "FOLDER"),
    "coco captions SOURCE=FOLDER": (["coco", "captions", "FOLDER"], "FOLDER"),
    "coco captions --output FOLDER": (["coco", "captions", "ANNOTATIONS", "--n", "1", "--output", "FOLDER"], "FOLDER"),
    "coco reference IMAGES=FILE": (["coco", "reference", "FILE"], "FILE"),
    "coco reference --output FOLDER": (["coco", "reference", "FOLDER", "--output", "FOLDER/stats.npz"], "stats.npz"),
    "toy train-teacher --output FILE": (["toy", "train-teacher", "--output", "FILE", "--checkpoints", "FOLDER/c"],
                                        "--output FILE"),
    "toy train-teacher --checkpoints FILE": (["toy", "train-teacher", "--output", "FOLDER/t", "--checkpoints", "FILE"],
                                             "--checkpoints FILE"),
    "toy train-teacher --init-from FILE": (["toy", "train-teacher", "--output", "FOLDER/t", "--checkpoints",
                                            "FOLDER/c", "--init-from", "FILE"], "--init-from FILE"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_path_of_the_wrong_kind_ends_in_one_line(case, tiny_teacher_dir, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setenv("EMD_T2I_CACHE", str(tmp_path / "cache"))
    file, folder = tmp_path / "notes.txt", tmp_path / "things"
    file.write_text("not what was asked for\n")
    folder.mkdir()
    for name in ("a.png", "b.png"):  # a reference folder of two images (their pixels are read later)
        (folder / name).write_bytes(b"")
    (folder / "stats.npz").mkdir()
    (folder / "inception-2015-12-05.pt").write_bytes(b"")  # found by name; loaded only after every check
    annotations = tmp_path / "captions.json"
    annotations.write_text('{"annotations": [{"caption": "a cat", "image_id": 1, "id": 1}], "images": []}')
    names = {"FILE": str(file), "FOLDER": str(folder), "TEACHER": str(tiny_teacher_dir), "PROMPTS": str(prompt_file),
             "ANNOTATIONS": str(annotations)}
    args, named = CASES[case]
    for key, value in names.items():
        args = [a.replace(key, value) for a in args]
        named = named.replace(key, value)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], result.output
    assert file.read_text() == "not what was asked for\n"  # nothing the user made is touched
