"""Toy-domain metrics: an attribute classifier, prompt accuracy, diversity and a Frechet distance in its features."""

from __future__ import annotations

import argparse
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import linalg
from torch import Tensor, nn

from emd_t2i.files import save_safetensors
from emd_t2i.toy import CLASSIFIER_PATH, TEACHER_DIR, domain

ATTRIBUTES = ("shape", "colour", "background")
NUM_CLASSES = {
    "shape": len(domain.SHAPES),
    "colour": len(domain.COLOURS),
    "background": len(domain.BACKGROUNDS),
}
GEOMETRY = ("cx", "cy", "size")


class AttributeClassifier(nn.Module):
    """A small CNN: class heads for shape, colour, background and a regression head for (cx, cy, size)."""

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),  # 16x16
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 8x8
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * width * (domain.IMAGE_SIZE // 8) ** 2, feature_dim), nn.SiLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, k) for name, k in NUM_CLASSES.items()})
        self.geometry = nn.Linear(feature_dim, len(GEOMETRY))

    def features(self, images: Tensor) -> Tensor:
        """The penultimate features (N, feature_dim), the space of the Frechet distance."""
        return self.trunk(images)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        h = self.features(images)
        return {**{name: head(h) for name, head in self.heads.items()}, "geometry": self.geometry(h)}


def geometry_targets(attrs: domain.Attributes) -> Tensor:
    """(cx, cy, size) scaled to about [0, 1], the regression targets."""
    span = domain.MAX_SIZE - domain.MIN_SIZE
    g = np.stack(
        [attrs.cx / domain.IMAGE_SIZE, attrs.cy / domain.IMAGE_SIZE, (attrs.size - domain.MIN_SIZE) / span], 1
    )
    return torch.from_numpy(g).float()


def geometry_pixels(scaled: Tensor) -> Tensor:
    """Inverse of geometry_targets: predicted (cx, cy, size) in pixels."""
    span = domain.MAX_SIZE - domain.MIN_SIZE
    return scaled * torch.tensor([domain.IMAGE_SIZE, domain.IMAGE_SIZE, span]) + torch.tensor(
        [0, 0, domain.MIN_SIZE]
    )


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
    """Mild blur and noise, so the classifier also judges imperfect generated images fairly."""
    n = len(images)
    kernel = torch.tensor([0.25, 0.5, 0.25])
    blurred = F.conv2d(
        F.pad(images, (1, 1, 1, 1), mode="replicate"),
        (kernel[:, None] * kernel)[None, None].repeat(3, 1, 1, 1),
        groups=3,
    )
    amount = torch.rand(n, 1, 1, 1, generator=gen)
    noise = 0.1 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(images.shape, generator=gen)
    return (images + amount * (blurred - images) + noise).clamp(-1, 1)


def classifier_loss(model: AttributeClassifier, images: Tensor, attrs: domain.Attributes) -> Tensor:
    out = model(images)
    loss = F.mse_loss(out["geometry"], geometry_targets(attrs)) * 10
    for name in ATTRIBUTES:
        loss = loss + F.cross_entropy(out[name], torch.from_numpy(getattr(attrs, name)).long())
    return loss


def train_classifier(
    steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, seed: int = 0
) -> AttributeClassifier:
    """Train the attribute classifier on freshly rendered, augmented images (seeds disjoint from evaluation)."""
    torch.manual_seed(seed)
    model = AttributeClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        attrs = domain.sample_attributes(batch_size, seed=2 * 10**9 + seed * 10**6 + step)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        loss = classifier_loss(model, augment(domain.render(attrs), gen), attrs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def save_classifier(model: AttributeClassifier, path: str | Path = CLASSIFIER_PATH) -> None:
    save_safetensors(model.state_dict(), path, metadata={"model": "emd_t2i.toy.metrics.AttributeClassifier"})


@lru_cache(maxsize=4)
def load_classifier(path: str | Path = CLASSIFIER_PATH) -> AttributeClassifier:
    """The shipped classifier (train one with `python -m emd_t2i.toy.metrics train-classifier`)."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"no classifier at {path}; run `python -m emd_t2i.toy.metrics train-classifier`"
        )
    model = AttributeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(
    images: Tensor, classifier: AttributeClassifier | None = None, batch_size: int = 512
) -> dict[str, Tensor]:
    """Predicted class indices per attribute, geometry (N, 3) in pixels, and penultimate features."""
    classifier = classifier or load_classifier()
    outs = []
    for chunk in images.float().split(batch_size):
        out = classifier(chunk)
        outs.append(
            {**{a: out[a].argmax(1) for a in ATTRIBUTES}, "geometry": geometry_pixels(out["geometry"])}
        )
        outs[-1]["features"] = classifier.features(chunk)
    return {key: torch.cat([o[key] for o in outs]) for key in outs[0]}


def attribute_accuracy(images: Tensor, attrs: domain.Attributes, classifier=None) -> dict[str, float]:
    """Classifier accuracy per attribute against known ground truth (for held-out real images)."""
    pred = predict(images, classifier)
    return {a: float((pred[a].numpy() == getattr(attrs, a)).mean()) for a in ATTRIBUTES}


def prompt_accuracy(images: Tensor, prompts: list[str], classifier=None) -> dict[str, float]:
    """Fraction of images showing the attribute their prompt names, per attribute and all three at once."""
    assert len(images) == len(prompts), "one prompt per image"
    pred = predict(images, classifier)
    wanted = np.array([[-1 if v is None else v for v in domain.parse_prompt(p)] for p in prompts])
    hits = np.stack([pred[a].numpy() == wanted[:, i] for i, a in enumerate(ATTRIBUTES)], 1)
    named = wanted >= 0
    result = {
        a: float(hits[named[:, i], i].mean()) if named[:, i].any() else float("nan")
        for i, a in enumerate(ATTRIBUTES)
    }
    complete = named.all(1)
    result["all"] = float(hits[complete].all(1).mean()) if complete.any() else float("nan")
    return result


def geometry_spread(images: Tensor, classifier=None) -> Tensor:
    """Standard deviation of the predicted (cx, cy, size) over a set of images."""
    return predict(images, classifier)["geometry"].std(0)


def diversity_ratio(images: Tensor, real_images: Tensor, classifier=None) -> dict[str, float]:
    """Spread of position and size in `images` relative to real images of the same prompt (1 = as diverse)."""
    ratio = geometry_spread(images, classifier) / geometry_spread(real_images, classifier)
    return {**{g: float(r) for g, r in zip(GEOMETRY, ratio)}, "mean": float(ratio.mean())}


def diversity_prompts(k: int = 3, seed: int = 0) -> list[str]:
    """k prompts of distinct shape, colour and background: every 7th of the 24 evaluation triples."""
    return evaluation_prompts(24, seed)[::7][:k]


def mean_diversity(generate, prompts: list[str], samples: int, seed: int = 0, classifier=None) -> dict:
    """diversity_ratio of `samples` images for each prompt (against as many real ones), and its mean over prompts.

    `generate(prompts, seed) -> images`. One prompt and 64 images measure the ratio to about +-0.035; 3 x 192 to
    about +-0.015, and averaging prompts keeps one easy prompt from deciding the verdict. `geometry` is the ratio of
    each of (cx, cy, size) averaged over the prompts: which spread a source lacks.
    """
    ratios = {}
    for i, prompt in enumerate(prompts):
        images = generate([prompt] * samples, seed + 1000 * i)
        real = real_images_for_prompt(prompt, samples, seed + i)
        ratios[prompt] = diversity_ratio(images, real, classifier)
    per_prompt = {prompt: r["mean"] for prompt, r in ratios.items()}
    geometry = {g: sum(r[g] for r in ratios.values()) / len(ratios) for g in GEOMETRY}
    return {"samples": samples, "per_prompt": per_prompt, "geometry": geometry,
            "mean": sum(per_prompt.values()) / len(per_prompt)}


def real_images_for_prompt(prompt: str, n: int, seed: int = 0) -> Tensor:
    """n real images with the attributes the prompt names (random where it names none)."""
    shape, colour, background = domain.parse_prompt(prompt)
    return domain.render(domain.sample_attributes(n, seed, shape=shape, colour=colour, background=background))


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets."""
    a, b = features_a.double().numpy(), features_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def classifier_frechet_distance(images_a: Tensor, images_b: Tensor, classifier=None) -> float:
    """Frechet distance between two image sets in the classifier's penultimate feature space."""
    return frechet_distance(
        predict(images_a, classifier)["features"], predict(images_b, classifier)["features"]
    )


def evaluation_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts cycling over every (shape, colour, background) triple, each in a random phrasing."""
    combos = list(np.ndindex(len(domain.SHAPES), len(domain.COLOURS), len(domain.BACKGROUNDS)))
    phrasing = np.random.default_rng(seed).integers(0, len(domain.PHRASINGS), n)
    return [domain.caption(*combos[i % len(combos)], phrasing[i]) for i in range(n)]


def load_pipeline(path: str | Path = TEACHER_DIR):
    """The toy teacher as a plain diffusers StableDiffusionPipeline (float32, CPU, no progress bars)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_teacher(
    pipe, prompts: list[str], steps: int = 25, guidance: float = 4.0, seed: int = 0, batch_size: int = 120
) -> Tensor:
    """Teacher samples in [-1, 1], (N, 3, H, W): `steps` steps of the pipeline's scheduler (DDIM) with CFG."""
    images = []
    for i in range(0, len(prompts), batch_size):
        gen = torch.Generator().manual_seed(seed + i)
        out = pipe(
            prompts[i : i + batch_size],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="pt",
        )
        images.append(out.images * 2 - 1)
    return torch.cat(images)


def evaluate_teacher(
    path=TEACHER_DIR, n: int = 240, steps: int = 25, guidance: float = 4.0, seed: int = 0
) -> dict:
    """Prompt accuracy, diversity and Frechet distance to real data of N-step guided teacher samples."""
    prompts = evaluation_prompts(n, seed)
    start = time.time()
    images = sample_teacher(load_pipeline(path), prompts, steps, guidance, seed)
    seconds = time.time() - start
    real = torch.cat([real_images_for_prompt(p, 1, seed=seed + i) for i, p in enumerate(prompts)])
    fixed = prompts[0]
    fixed_images = sample_teacher(load_pipeline(path), [fixed] * 64, steps, guidance, seed + 1)
    return {
        "n": n, "steps": steps, "guidance": guidance, "seconds": round(seconds, 1),
        "prompt_accuracy": prompt_accuracy(images, prompts),
        "real_prompt_accuracy": prompt_accuracy(real, prompts),
        "frechet_distance_to_real": classifier_frechet_distance(images, real),
        "diversity_ratio": {"prompt": fixed, **diversity_ratio(fixed_images, real_images_for_prompt(fixed, 64, seed))},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train-classifier", help="train the attribute classifier and save it in the package"
    )
    train.add_argument("--steps", type=int, default=1500)
    train.add_argument("--output", default=str(CLASSIFIER_PATH))
    evaluate = sub.add_parser("eval-teacher", help="measure N-step guided teacher samples")
    evaluate.add_argument("--teacher", default=str(TEACHER_DIR))
    evaluate.add_argument("--n", type=int, default=240)
    evaluate.add_argument("--steps", type=int, default=25)
    evaluate.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args(argv)
    if args.command == "train-classifier":
        model = train_classifier(args.steps)
        save_classifier(model, args.output)
        attrs = domain.sample_attributes(2000, seed=7)
        print(json.dumps(attribute_accuracy(domain.render(attrs), attrs, model)))
    else:
        print(json.dumps(evaluate_teacher(args.teacher, args.n, args.steps, args.guidance), indent=2))


if __name__ == "__main__":
    main()
