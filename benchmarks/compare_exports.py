"""Compare two export folders file by file: sha256 of every file, the .safetensors ones with their metadata keys
sorted first (emd_t2i.files.sorted_safetensors_header, as every export since 8e9f4b4 is written), so that exports
written before that commit can be compared byte for byte with later ones. README.md (the model card, which names
its own folder) is listed but not judged. Exit status 1 if any other file differs or is missing.

    python benchmarks/compare_exports.py runs/before/export runs/after/export
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from emd_t2i.files import file_sha256, sorted_safetensors_header


def canonical_sha256(path: Path) -> str:
    """sha256 of a file; of a .safetensors file as if its metadata keys were sorted (read once, nothing copied)."""
    if path.suffix != ".safetensors":
        return file_sha256(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = f.read(8)
        digest.update(sorted_safetensors_header(size + f.read(int.from_bytes(size, "little"))))
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def main(a: Path, b: Path) -> int:
    names = sorted({p.relative_to(a) for p in a.rglob("*") if p.is_file()} |
                   {p.relative_to(b) for p in b.rglob("*") if p.is_file()})
    differ = 0
    for name in names:
        sha = [canonical_sha256(root / name) if (root / name).is_file() else "missing" for root in (a, b)]
        same = sha[0] == sha[1]
        judged = name.name != "README.md"
        differ += judged and not same
        print(f"{'same' if same else 'DIFFERENT' if judged else 'differs (not judged)'}  {sha[0][:16]}  {sha[1][:16]}  "
              f"{name}")
    print(f"{len(names)} files, {differ} judged files differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
