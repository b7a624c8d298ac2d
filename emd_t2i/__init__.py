"""emd-t2i: distill a Stable Diffusion teacher into a one-step generator with EM Distillation (EMD).

The Python API is what the `emd-t2i` commands call, one function each (imported on first use, so `import emd_t2i`
stays light):

    from emd_t2i import build_config, distill, evaluate_export, export_run, sample

    cfg = build_config(teacher="toy", output="runs/toy")   # the teacher's preset under these flags, validated
    run_dir = distill(cfg)                                  # `emd-t2i distill`; call again to resume
    export = export_run(run_dir, overwrite=True)            # `emd-t2i export`: run_dir/export
    images = sample(["a red circle on a white background"], export).images   # `emd-t2i sample`: PIL images
    report = evaluate_export(export)                        # `emd-t2i eval` of a toy export (eval.json)

`evaluate_coco` is `emd-t2i eval --prompts ...` (the COCO protocols); `DistillConfig` holds every flag.
"""

__version__ = "0.1.0"

_API = {
    "DistillConfig": "emd_t2i.training.config",
    "build_config": "emd_t2i.training.config",
    "distill": "emd_t2i.training.loop",
    "export_run": "emd_t2i.export.writer",
    "sample": "emd_t2i.export.sample",
    "evaluate_export": "emd_t2i.evaluation.toy",
    "evaluate_coco": "emd_t2i.evaluation.coco",
}
__all__ = [
    "DistillConfig",
    "__version__",
    "build_config",
    "distill",
    "evaluate_coco",
    "evaluate_export",
    "export_run",
    "sample",
]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'emd_t2i' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
