"""Mode coverage of a student against its teacher (TV, modes recalled, entropy ratio) and geometric shape fidelity.

Where EMD should beat DMD is in covering the teacher's modes. For a fixed set of under-specified prompts,
each sample is reduced to a categorical label (for the toy: the classifier's (shape, colour, background)), and the
student's label distribution is compared with the teacher's 25-step samples at the same guidance. Everything here
is a pure function of label arrays or images, so `emd-t2i eval` (or a benchmark) can call it on any sampler.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from emd_t2i.toy import domain

RECALL_FRACTION = 1 / 3  # a teacher mode is recalled when the student has at least this share of its frequency


# ---------------------------------------------------------------- labels -> mode frequencies
def _as_rows(labels) -> np.ndarray:
    """(N, A) integer array from (N,) / (N, A) arrays, tensors or a list of tuples."""
    rows = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    rows = rows.reshape(len(rows), -1) if rows.size else rows.reshape(0, 1)
    assert np.issubdtype(rows.dtype, np.integer), f"labels must be integer class indices, got {rows.dtype}"
    return rows


def mode_counts(student_labels, teacher_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(modes, student counts, teacher counts) over the union of the modes seen in either sample."""
    student, teacher = _as_rows(student_labels), _as_rows(teacher_labels)
    assert student.shape[1] == teacher.shape[1], "student and teacher labels need the same attributes"
    assert len(student) and len(teacher), "need at least one student and one teacher sample"
    modes, index = np.unique(np.concatenate([student, teacher]), axis=0, return_inverse=True)
    index = index.reshape(-1)
    return (modes, np.bincount(index[: len(student)], minlength=len(modes)),
            np.bincount(index[len(student):], minlength=len(modes)))


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """TV(p, q) = 1/2 sum_m |p_m - q_m| over the last axis (probabilities)."""
    return 0.5 * np.abs(p - q).sum(-1)


def modes_recalled(p_student: np.ndarray, p_teacher: np.ndarray, fraction: float = RECALL_FRACTION) -> np.ndarray:
    """Share of the teacher's modes (p_teacher > 0) whose student frequency is at least `fraction` of the teacher's."""
    present = p_teacher > 0
    hit = (p_student >= fraction * p_teacher) & present
    return hit.sum(-1) / np.maximum(present.sum(-1), 1)


def entropy(p: np.ndarray) -> np.ndarray:
    """Plug-in Shannon entropy in nats over the last axis."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def entropy_ratio(p_student: np.ndarray, p_teacher: np.ndarray) -> np.ndarray:
    """H(student) / H(teacher): 1 = as spread over modes as the teacher, 0 = one mode (nan if the teacher has one)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return entropy(p_student) / entropy(p_teacher)


def _statistics(p_student: np.ndarray, p_teacher: np.ndarray, fraction: float) -> dict[str, np.ndarray]:
    return {"tv": total_variation(p_student, p_teacher),
            "modes_recalled": modes_recalled(p_student, p_teacher, fraction),
            "entropy_ratio": entropy_ratio(p_student, p_teacher)}


def mode_coverage(student_labels, teacher_labels, seed: int = 0, bootstrap: int = 1000,
                  fraction: float = RECALL_FRACTION) -> dict:
    """TV distance, modes recalled and entropy ratio of the student's label distribution against the teacher's,
    each with a bootstrap standard error (`<name>_se`).

    Labels are integer class indices, (N,) or (N, A) (one row per sample, e.g. (shape, colour, background)); a
    mode is one distinct row. The bootstrap resamples both sets with replacement (`bootstrap` times, seeded:
    resampling N labels from their empirical distribution is one multinomial draw of counts). The plug-in TV of two
    finite samples is biased upward (E[TV] > 0 for equal distributions, about sqrt(M / (2 pi N)) for M equally
    likely modes), so `tv_floor` reports the TV expected between two samples of these sizes drawn from one
    distribution (the pooled one, by the same bootstrap): a student is distinguishable from its teacher when
    `tv - tv_floor` is several `tv_se`. Likewise a teacher mode seen once recalls only if the student shows it.
    """
    _, c_student, c_teacher = mode_counts(student_labels, teacher_labels)
    n_student, n_teacher = int(c_student.sum()), int(c_teacher.sum())
    p_student, p_teacher = c_student / n_student, c_teacher / n_teacher
    point = _statistics(p_student, p_teacher, fraction)
    rng = np.random.default_rng(seed)
    boot_student = rng.multinomial(n_student, p_student, size=bootstrap) / n_student
    boot_teacher = rng.multinomial(n_teacher, p_teacher, size=bootstrap) / n_teacher
    boot = _statistics(boot_student, boot_teacher, fraction)
    pooled = (c_student + c_teacher) / (n_student + n_teacher)
    null = total_variation(rng.multinomial(n_student, pooled, size=bootstrap) / n_student,
                           rng.multinomial(n_teacher, pooled, size=bootstrap) / n_teacher)
    result = {}
    for name, value in point.items():
        result[name] = float(value)
        finite = boot[name][np.isfinite(boot[name])]
        result[f"{name}_se"] = float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
    result.update(tv_floor=float(null.mean()), n_student=n_student, n_teacher=n_teacher,
                  teacher_modes=int((c_teacher > 0).sum()), student_modes=int((c_student > 0).sum()),
                  bootstrap=bootstrap, seed=seed)
    return result


def attribute_labels(images: Tensor, classifier=None) -> np.ndarray:
    """(N, 3) labels (shape, colour, background) of images in [-1, 1], read by the toy's attribute classifier."""
    from emd_t2i.toy.metrics import ATTRIBUTES, predict

    pred = predict(images, classifier)
    return np.stack([pred[a].cpu().numpy() for a in ATTRIBUTES], 1)


# Under-specified prompts of the toy evaluation, with the modes each leaves open (shape x colour x background).
UNDERSPECIFIED_PROMPTS = (
    "a shape",  # 24
    "a circle",  # 8: colour x background
    "a shape on a white background",  # 12: shape x colour
    "a red shape",  # 6: shape x background
    "a yellow shape on black",  # 3: shape
    "a blue square",  # 2: background
)


TEACHER_SEED_OFFSET = 1_000_003  # the teacher's samples draw other noise than the student's: independent samples


def coverage_report(student_images, teacher_images, prompts=UNDERSPECIFIED_PROMPTS, n: int = 384, seed: int = 0,
                    classifier=None) -> dict:
    """`mode_coverage` of a student against its teacher on each of `prompts` (n samples each), and their mean.

    student_images / teacher_images: (prompts, seed) -> images in [-1, 1]; each is called once with every prompt
    repeated n times, the student with `seed` and the teacher with seed + TEACHER_SEED_OFFSET (the bootstrap
    assumes independent samples; a student and a teacher fed the same noise can correlate).
    """
    batch = [p for p in prompts for _ in range(n)]
    labels = {name: attribute_labels(source(batch, seed + offset), classifier).reshape(len(prompts), n, -1)
              for name, source, offset in (("student", student_images, 0),
                                           ("teacher", teacher_images, TEACHER_SEED_OFFSET))}
    return coverage_from_labels(labels["student"], labels["teacher"], prompts, seed)


def coverage_from_labels(student_labels, teacher_labels, prompts=UNDERSPECIFIED_PROMPTS, seed: int = 0) -> dict:
    """`mode_coverage` per prompt from labels shaped (prompts, samples, attributes), and the mean over prompts,
    whose standard errors combine the prompts' as independent: sqrt(sum se^2) / P."""
    per_prompt = {p: mode_coverage(student_labels[i], teacher_labels[i], seed) for i, p in enumerate(prompts)}
    mean = {}
    for key in ("tv", "modes_recalled", "entropy_ratio", "tv_floor"):
        values = np.array([r[key] for r in per_prompt.values()])
        mean[key] = float(np.nanmean(values))
        if f"{key}_se" in next(iter(per_prompt.values())):
            ses = np.array([r[f"{key}_se"] for r in per_prompt.values()])
            mean[f"{key}_se"] = float(np.sqrt(np.nansum(ses**2)) / np.isfinite(values).sum())
    return {"n_per_prompt": len(student_labels[0]), "seed": seed, "mean": mean, "prompts": per_prompt}


def fidelity_report(images: Tensor, prompts: list[str], classifier=None, soft: bool = False) -> dict:
    """Shape fidelity (`shape_fidelity`, of the classified shape) of images of full prompts: the mean with its
    standard error, and the mean over the images whose shape the classifier reads as the prompt's."""
    from emd_t2i.toy.metrics import predict

    predicted = predict(images, classifier)["shape"].cpu()
    fidelity = shape_fidelity(images, predicted, soft=soft)
    wanted = torch.tensor([-1 if s is None else s for s in (domain.parse_prompt(p)[0] for p in prompts)])
    correct = predicted == wanted
    return {"mean": float(fidelity.mean()), "se": float(fidelity.std() / len(fidelity) ** 0.5),
            "where_shape_correct": float(fidelity[correct].mean()) if correct.any() else float("nan")}


# ---------------------------------------------------------------- shape fidelity
def foreground(images: Tensor) -> Tensor:
    """Soft foreground membership (N, H, W) in [0, 1] of images in [-1, 1] with one shape on a plain background.

    The background colour is the median of the border pixels, the foreground colour the median of the pixels
    farthest from it (beyond 3/4 of the largest distance); each pixel is projected on the line between the two,
    so a blurred edge reads as partial membership and a hard one as 0 or 1.
    """
    x = images.detach().float().cpu()
    n = len(x)
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)  # (N, C, P)
    bg = border.median(dim=2).values[:, :, None, None]
    dist = (x - bg).norm(dim=1)  # (N, H, W)
    far = dist >= 0.75 * dist.flatten(1).max(1).values[:, None, None]
    fg = torch.stack([x[i][:, far[i]].median(dim=1).values for i in range(n)])[:, :, None, None]
    axis = fg - bg
    along = ((x - bg) * axis).sum(1) / axis.pow(2).sum(1).clamp_min(1e-6)
    return along.clamp(0, 1)


def mask_geometry(mask: Tensor) -> Tensor:
    """(cx, cy, size) in pixels from the bounding box of the largest connected part of each hard mask (N, H, W).

    Every shape of the domain is drawn inside the square [cx - s, cx + s] x [cy - s, cy + s] and touches all four
    sides (domain.shape_masks), so the box gives its position and half-extent whatever the class. NaN if empty.
    """
    out = torch.full((len(mask), 3), float("nan"), dtype=torch.float64)
    for i, m in enumerate(mask.cpu().numpy()):
        parts, count = ndimage.label(m)
        if count == 0:
            continue
        largest = 1 + int(np.argmax(ndimage.sum(m, parts, range(1, count + 1))))
        ys, xs = np.nonzero(parts == largest)
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        out[i] = torch.tensor([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2, (width + height) / 4])
    return out


def ideal_masks(shapes, geometry: Tensor) -> Tensor:
    """The domain's own hard masks (N, H, W) of class `shapes` at `geometry` (cx, cy, size) in pixels."""
    g = geometry.double().cpu().numpy()
    shapes = np.asarray(shapes.cpu() if isinstance(shapes, Tensor) else shapes, dtype=np.int64).reshape(-1)
    zeros = np.zeros(len(shapes), dtype=np.int64)
    attrs = domain.Attributes(shapes, zeros, zeros, g[:, 0], g[:, 1], g[:, 2])
    return torch.from_numpy(domain.shape_masks(attrs))


def soft_iou(membership: Tensor, ideal: Tensor) -> Tensor:
    """sum min(m, m*) / sum max(m, m*) per image: 1 only for a hard-edged mask equal to the ideal one."""
    m, ideal = membership.flatten(1).double(), ideal.flatten(1).double()
    return torch.minimum(m, ideal).sum(1) / torch.maximum(m, ideal).sum(1).clamp_min(1e-12)


# Sub-pixel refinement of the box's (cx, cy, size): the box is quantised to whole pixels.
_OFFSETS = torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5], dtype=torch.float64)
_GRID = torch.cartesian_prod(_OFFSETS, _OFFSETS, _OFFSETS)  # (125, 3)


def shape_fidelity(images: Tensor, shapes=None, classifier=None, soft: bool = False, chunk: int = 128) -> Tensor:
    """How well each image's shape matches the ideal shape of its class at its position and size, in [0, 1] (N,).

    The image's foreground (`foreground`, thresholded at half way between background and shape colour) is compared
    with the domain's ideal mask of class `shapes` (indices into domain.SHAPES; by default the attribute
    classifier's prediction) placed at the box of the foreground's largest part (`mask_geometry`) and refined by up
    to half a pixel in position and size to the best match: their IoU. Ideal renders score 1 (0.994 on average:
    pixel quantisation), rounded corners, dents and stray blobs lower it (a superellipse |x|^2.5 + |y|^2.5 <= s^2.5
    0.87, a circle scored as a square 0.83), so a blobby square the classifier accepts is not a perfect square.
    Real images through the toy VAE score 0.97, the 25-step teacher 0.91. `soft=True` uses the soft membership
    instead (sum min / sum max), which also charges blurred edges (a square blurred by a 1-px Gaussian: 0.85,
    hard 0.99) but then the VAE's own blur caps it at 0.85. An image with no foreground scores 0.
    """
    if shapes is None:
        from emd_t2i.toy.metrics import predict

        shapes = predict(images, classifier)["shape"]
    shapes = torch.as_tensor(np.asarray(shapes.cpu() if isinstance(shapes, Tensor) else shapes)).long().reshape(-1)
    assert len(shapes) == len(images), "one shape class per image"
    membership = foreground(images)
    geometry = mask_geometry(membership >= 0.5)
    if not soft:
        membership = (membership >= 0.5).double()
    scores = torch.zeros(len(images), dtype=torch.float64)
    valid = torch.isfinite(geometry).all(1).nonzero().flatten()
    for idx in valid.split(chunk):
        g = len(_GRID)
        candidates = (geometry[idx, None, :] + _GRID[None]).reshape(-1, 3)
        candidates[:, 2] = candidates[:, 2].clamp_min(0.5)
        ideal = ideal_masks(shapes[idx].repeat_interleave(g), candidates)
        iou = soft_iou(membership[idx].repeat_interleave(g, dim=0), ideal).reshape(len(idx), g)
        scores[idx] = iou.max(1).values
    return scores.float()


# ---------------------------------------------------------------- reference numbers on the shipped teacher
@torch.no_grad()
def vae_round_trip(pipe, images: Tensor) -> Tensor:
    """Images through the teacher's VAE (posterior mean): the ceiling of anything decoded from its latents."""
    vae = pipe.vae
    latents = vae.encode(images.to(vae.dtype)).latent_dist.mean
    return vae.decode(latents).sample.float().clamp(-1, 1)


def reference(n: int = 240, guidance: float = 4.0, seed: int = 0, coverage_guidance: float = 1.75,
              coverage_samples: int = 384, teacher=None) -> dict:
    """Shape fidelity and classifier shape accuracy of real images, real images through the VAE, and the teacher's
    25-step and 1-step samples (evaluation prompts, guidance `guidance`); and, on the under-specified prompts at
    `coverage_guidance` (the toy preset's), the mode coverage of the data, of a second 25-step set and of the 1-step
    teacher, each against the 25-step teacher: what a student's numbers should be read against."""
    from emd_t2i.toy.metrics import (
        evaluation_prompts,
        load_pipeline,
        predict,
        real_images_for_prompt,
        sample_teacher,
    )

    pipe = load_pipeline() if teacher is None else load_pipeline(teacher)
    prompts = evaluation_prompts(n, seed)
    wanted = torch.tensor([domain.parse_prompt(p)[0] for p in prompts])
    real = torch.cat([real_images_for_prompt(p, 1, seed=seed + i) for i, p in enumerate(prompts)])
    sources = {"real": real, "real through the VAE": vae_round_trip(pipe, real),
               "teacher 25 steps": sample_teacher(pipe, prompts, 25, guidance, seed),
               "teacher 1 step": sample_teacher(pipe, prompts, 1, guidance, seed)}
    out = {"n": n, "guidance": guidance, "shape": {}}
    for name, images in sources.items():
        out["shape"][name] = {"accuracy": float((predict(images)["shape"] == wanted).float().mean())}
        for kind, soft in (("fidelity", False), ("soft_fidelity", True)):
            report = fidelity_report(images, prompts, soft=soft)
            out["shape"][name].update({kind: report["mean"], f"{kind}_se": report["se"],
                                       f"{kind}_where_correct": report["where_shape_correct"]})

    def teacher_source(steps: int, offset: int):
        return lambda batch, s: sample_teacher(pipe, batch, steps, coverage_guidance, s + offset)

    def data(batch, s):
        return torch.cat([real_images_for_prompt(p, 1, seed=s + 7919 * i) for i, p in enumerate(batch)])

    teacher25 = teacher_source(25, 0)
    out["coverage"] = {"guidance": coverage_guidance, **{
        name: coverage_report(source, teacher25, n=coverage_samples, seed=seed)
        for name, source in (("data_vs_teacher25", data), ("teacher25_vs_teacher25", teacher_source(25, 1)),
                             ("teacher1_vs_teacher25", teacher_source(1, 2)))}}
    return out


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=reference.__doc__)
    parser.add_argument("--n", type=int, default=240)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--teacher", default=None, help="teacher folder [default: the shipped toy teacher]")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = json.dumps(reference(args.n, args.guidance, teacher=args.teacher), indent=1)
    print(result)
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(result + "\n")
