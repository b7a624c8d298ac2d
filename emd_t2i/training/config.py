"""The one validated, frozen configuration of a distillation run, resolved over its preset, and its config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emd_t2i.choices import WEIGHTINGS, Z_STEPS
from emd_t2i.errors import UserError
from emd_t2i.files import write_text_atomic
from emd_t2i.training.presets import DEFAULT_TARGET_MODULES, PRESETS, chosen_preset

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
REPORT_TO = ("none", "tensorboard", "wandb")
# Prompts of a toy evaluation (`emd-t2i eval`, benchmarks): prompt accuracy to about +-0.01 (+-0.019 at 240).
EVAL_PROMPTS = 960
# Fields that may change when a run is resumed (they do not change the math); `output` too, so that a run folder
# moved to another disk resumes from where it now is.
RESUMABLE_FIELDS = frozenset(
    {"output", "iterations", "checkpoint_every", "keep_checkpoints", "validate_every", "log_every", "report_to",
     "device", "profile", "embeddings", "embedding_cache"}
)
# How a run's global batch is split: free to change on resume as long as the global batch stays (checked apart).
SPLIT_FIELDS = frozenset({"batch_size", "grad_accum"})
# Facts config.json records beside the flags: how many processes ran, and the global batch that defines the run.
RUN_SHAPE = ("world_size", "global_batch")


def _opt(help: str, **kw) -> Any:
    return field(metadata={"help": help}, **kw)


@dataclass(frozen=True)
class DistillConfig:
    """Everything that defines an EMD distillation run. Field `foo_bar` is the CLI flag `--foo-bar`."""

    teacher: str = _opt("registry name (see `emd-t2i teachers`), local diffusers folder, or hub id", default="toy")
    preset: str | None = _opt("the defaults to start from, by name (toy-emd: the toy's EMD chain; see `--dry-run`); "
                              "default: the teacher's preset", default=None)
    prompts: str = _opt("prompt source: .txt/.jsonl/.csv file, folder of .txt, or hf:owner/name", default="")
    output: str = _opt("run folder (config, logs, samples, checkpoints, export)", default="runs/emd")
    prompt_column: str | None = _opt("column of a .jsonl/.csv/hf prompt source", default=None)
    embeddings: str | None = _opt("a store made by `emd-t2i prompts encode` for these --prompts and this --teacher "
                                  "(else prompts are encoded on the fly into a bounded cache)", default=None)
    embedding_cache: int = _opt("embeddings kept in RAM per process when encoding on the fly", default=4096)
    # --- EMD (docs/ALGORITHM.md)
    # The chain of the toy-emd preset, which matched DMD's accuracy with more of the teacher's modes at equal
    # iterations (docs/BENCHMARKS.md, "DMD vs EMD at equal iterations"): K = 2, the snr z step 0.1. DMD is K = 1,
    # gamma_eps = 2, gamma_z = 0; the z step's rules are compared in docs/ALGORITHM.md, "The z step".
    num_langevin_steps: int = _opt("K, Langevin steps of the E-step (1 with --gamma-eps 2 --gamma-z 0 is DMD)",
                                   default=2)
    gamma_eps: float = _opt("step size of the eps chain (L1)", default=0.5)
    gamma_z: float = _opt("step size of the z chain (L2); 0 keeps z fixed", default=0.1)
    z_step: str = _opt("z step per t: constant (gamma_z) | snr (gamma_z / (1 + alpha_t^2 / sigma_t^2)) | jacobian "
                       "(gamma_z / (1 + (alpha_t / sigma_t)^2 |J|^2), |J| the generator's measured Jacobian norm: "
                       "gamma_z is then the step relative to the stability limit at every t)", default="snr")
    jacobian_every: int = _opt("iterations between measurements of the generator's Jacobian norm |J| (--z-step "
                               "jacobian; logged as jacobian_norm)", default=100)
    noise_cancellation: bool = _opt("remove the injected eps-chain noise (NC1, NC2)", default=True)
    cancel_initial_noise: bool = _opt("with noise cancellation, also cancel the rest of eps_0 (NC0)",
                                      default=True)
    t_star: int = _opt("generator timestep t* (G1)", default=999)
    t_min: int = _opt("smallest E-step timestep", default=20)
    t_max: int = _opt("largest E-step timestep", default=980)
    guidance_scale: float = _opt("classifier-free guidance w of the teacher (C1)", default=4.5)
    weighting: str = _opt("M-step weighting w(t) (M1): dmd (DMD's per-sample normaliser) | dmd-t (its running mean "
                          "per t bin: a weight of t alone) | none", default="dmd")
    fake_updates: int = _opt("fake-score updates (F1) per generator update", default=5)
    # --- optimisation
    iterations: int = _opt("generator updates in total", default=4000)
    batch_size: int = _opt("samples per iteration and process", default=4)
    generator_lr: float = _opt("learning rate of the generator LoRA", default=1e-4)
    fake_lr: float = _opt("learning rate of the fake-score LoRA", default=1e-4)
    lr_schedule: str = _opt("constant | cosine (both learning rates decay to 0 over --iterations)",
                            default="constant")
    lr_warmup: int = _opt("iterations of linear learning-rate warmup from 0 (both learning rates, before the "
                          "constant/cosine schedule)", default=0)
    generator_rank: int = _opt("LoRA rank of the generator", default=64)
    fake_rank: int = _opt("LoRA rank of the fake score", default=64)
    target_modules: tuple[str, ...] = _opt("UNet modules that get LoRA", default=DEFAULT_TARGET_MODULES)
    max_grad_norm: float = _opt("gradient clipping (0 turns it off)", default=1.0)
    ema_decay: float = _opt("EMA decay of the generator weights; the EMA is what is exported (0: off)", default=0.0)
    grad_accum: int = _opt("gradient accumulation steps", default=1)
    mixed_precision: str = _opt("auto | no | fp16 | bf16 (frozen base in half precision, LoRA in fp32); auto = bf16 "
                                "on CUDA (fp16 where the GPU lacks bf16), no on CPU; fp16 keeps a dynamic loss scaler",
                                default="auto")
    gradient_checkpointing: bool = _opt("recompute UNet activations in backward", default=False)
    seed: int = _opt("seed of everything; a CPU run is reproducible bit for bit", default=0)
    # --- watching and saving
    log_every: int = _opt("iterations between log lines", default=10)
    validate_every: int = _opt("iterations between validation grids (0: only at the end)", default=250)
    num_validation_prompts: int = _opt("prompts in the validation grid (0: no grids at all)", default=4)
    checkpoint_every: int = _opt("iterations between checkpoints", default=250)
    keep_checkpoints: int = _opt("checkpoints kept (older ones are deleted)", default=2)
    report_to: str = _opt("none | tensorboard | wandb (JSONL logs are always written)", default="none")
    device: str = _opt("auto | cpu | cuda | cuda:N", default="auto")
    profile: bool = _opt("time UNet forward/backward apart from the rest of the iteration (synchronises CUDA after "
                         "each UNet call, a little slower)", default=False)

    def __post_init__(self):
        for problem in _problems(self):
            raise UserError(problem)

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"config.json: unknown keys {unknown}; was it written by another emd-t2i version?")
        if "target_modules" in data:
            data = {**data, "target_modules": tuple(data["target_modules"])}
        return cls(**data)

    def global_batch(self, world_size: int) -> int:
        """Samples per generator update over all processes: what the run's math depends on, not how it is split."""
        return world_size * self.grad_accum * self.batch_size

    def record(self, world_size: int) -> dict[str, Any]:
        """config.json: the flags, and the split they ran with."""
        return {**self.to_dict(), "world_size": world_size, "global_batch": self.global_batch(world_size)}

    def save(self, path: Path, world_size: int = 1) -> None:
        write_text_atomic(path, json.dumps(self.record(world_size), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> DistillConfig:
        return cls.from_dict({k: v for k, v in read_record(path).items() if k not in RUN_SHAPE})

    def differences(self, other: DistillConfig) -> list[str]:
        """Flags whose values differ and that would change the run's math (so resuming is refused); the split of
        the global batch (--batch-size, --grad-accum) is compared apart, as the global batch."""
        mine, theirs = self.to_dict(), other.to_dict()
        resumable = RESUMABLE_FIELDS if self.lr_schedule == "constant" else RESUMABLE_FIELDS - {"iterations"}
        return [flag(k) for k in mine if k not in resumable | SPLIT_FIELDS and mine[k] != theirs[k]]


def read_record(path: Path) -> dict[str, Any]:
    """The JSON object of a config.json, or a UserError that names the file."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} cannot be read ({type(err).__name__}): restore it, or start the run over "
                        "(`emd-t2i distill ... --overwrite` moves the run folder aside)") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a run's config: restore it, or start the run over "
                        "(`emd-t2i distill ... --overwrite` moves the run folder aside)")
    return data


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _problems(c: DistillConfig):
    if c.preset is not None and c.preset not in PRESETS:
        yield f"--preset must be one of {', '.join(PRESETS)} (got {c.preset!r})"
    positive = ("num_langevin_steps", "iterations", "batch_size", "generator_rank", "fake_rank", "grad_accum",
                "log_every", "checkpoint_every", "keep_checkpoints", "fake_updates", "embedding_cache", "jacobian_every")
    for name in positive:
        if getattr(c, name) < 1:
            yield f"{flag(name)} must be >= 1 (got {getattr(c, name)})"
    for name in ("gamma_eps", "gamma_z", "max_grad_norm", "validate_every", "num_validation_prompts", "lr_warmup"):
        if getattr(c, name) < 0:
            yield f"{flag(name)} must be >= 0 (got {getattr(c, name)})"
    for name in ("generator_lr", "fake_lr"):
        if not getattr(c, name) > 0:
            yield f"{flag(name)} must be > 0 (got {getattr(c, name)})"
    if c.lr_warmup >= c.iterations >= 1:
        yield f"--lr-warmup must be < --iterations (got {c.lr_warmup} >= {c.iterations}): lower --lr-warmup"
    if not 0 <= c.ema_decay < 1:
        yield f"--ema-decay must be in [0, 1) (0 turns the EMA off; got {c.ema_decay})"
    if c.gamma_eps > 2:
        yield f"--gamma-eps must be <= 2: (L1) contracts eps by (1 - gamma/2) per step (got {c.gamma_eps})"
    if not 0 <= c.t_min < c.t_max <= 999:
        yield f"need 0 <= --t-min < --t-max <= 999 (got --t-min {c.t_min}, --t-max {c.t_max})"
    if not 0 < c.t_star <= 999:
        yield f"--t-star must be in 1..999 (got {c.t_star})"
    if c.guidance_scale < 1:
        yield f"--guidance-scale must be >= 1 (1 = no guidance; got {c.guidance_scale})"
    if c.lr_schedule not in LR_SCHEDULES:
        yield f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)} (got {c.lr_schedule!r})"
    if c.z_step not in Z_STEPS:
        yield f"--z-step must be one of {', '.join(Z_STEPS)} (got {c.z_step!r})"
    if c.weighting not in WEIGHTINGS:
        yield f"--weighting must be one of {', '.join(WEIGHTINGS)} (got {c.weighting!r})"
    if c.mixed_precision not in MIXED_PRECISION:
        yield f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)} (got {c.mixed_precision!r})"
    if c.report_to not in REPORT_TO:
        yield f"--report-to must be one of {', '.join(REPORT_TO)} (got {c.report_to!r})"
    if not c.target_modules:
        yield "--target-modules needs at least one module name"
    if not (c.device in ("auto", "cpu", "cuda") or c.device.startswith("cuda:")):
        yield f"--device must be auto, cpu, cuda or cuda:N (got {c.device!r})"


def build_config(**given: Any) -> DistillConfig:
    """The config from the flags a user gave (None = not given), over the teacher's preset, over defaults."""
    given = {k: v for k, v in given.items() if v is not None}
    name = chosen_preset(given.get("preset"), given.get("teacher", DistillConfig.teacher))
    return DistillConfig(**{**PRESETS.get(name, {}), **given})


def resolve_mixed_precision(value: str, device_type: str, bf16_supported: bool) -> str:
    """What --mixed-precision means on a device: "auto" becomes bf16 on CUDA (fp16 without bf16), "no" elsewhere."""
    if value != "auto":
        return value
    if device_type != "cuda":
        return "no"  # most CPUs gain little speed from half precision and would lose its accuracy
    return "bf16" if bf16_supported else "fp16"
