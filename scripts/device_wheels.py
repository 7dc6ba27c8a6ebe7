"""The packages `benchmarks/bench_gpu.py` needs that the lent GPU machine lacks, as wheels for its Python (3.12,
x86-64), into .whl/ (git-ignored), to carry there (see the device tool's README and bench_gpu.py's docstring).

The machine holds torch, torchvision, numpy, pillow, onnx, onnxruntime, rich, typer, regex, huggingface_hub,
safetensors, tokenizers, timm and pandas (its KINDS.md); clipengine runs from the carried working tree
(PYTHONPATH), over the torch that is there. Versions are this machine's, so that both run the same code.

    python scripts/device_wheels.py
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
# the import-time needs of `index` and `train` beyond what is there (fsspec and aiohttp are), and open_clip_train's
PACKAGES = ["open_clip_torch", "ftfy", "wcwidth", "faiss-cpu", "braceexpand", "platformdirs", "webdataset"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
LIMIT = 64 << 20  # what a device call may carry, the working tree included


def main() -> None:
    shutil.rmtree(WHEELS, ignore_errors=True)
    pinned = [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(WHEELS), *pinned]
    for platform in PLATFORMS:
        command[-len(pinned):-len(pinned)] = ["--platform", platform]
    subprocess.run(command, check=True)
    size = sum(p.stat().st_size for p in WHEELS.iterdir())
    print(f"{len(list(WHEELS.iterdir()))} wheels, {size / 2**20:.1f} MiB in {WHEELS}")
    if size > LIMIT * 3 // 4:
        raise SystemExit(f"error: {size / 2**20:.0f} MiB leaves too little of the {LIMIT >> 20} MiB a call carries")


if __name__ == "__main__":
    main()
