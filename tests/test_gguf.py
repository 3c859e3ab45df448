"""GGUF files: tiny models exported the way llama.cpp converts them load with the HF folder's logits,
quantized tensors dequantize exactly as gguf-py does, and bad files fail with one clear line.

The demo test compares llmchat on the real SmolLM2 Q4_1 GGUF with llmchat and transformers on the
float32 folder transformers built from that same file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

import llmchat
from llmchat.engine import q4kernel
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.gguf import SUPPORTED_TYPES, GGUFFile
from llmchat.engine.package import open_package
from tests.gguf_export import export_gguf, quantized_copy, write_typed_tensors
from tests.hf_reference import llmchat_greedy
from tests.tiny_models import BOS, CHATML_TEMPLATE, IM_END

TinyModelFactory = Callable[..., Path]
TOL = 1e-4
NEW_TOKENS = 20
PARITY_KINDS = (
    "llama",
    "llama3-rope",
    "llama-tied",
    "llama-bias",
    "llama-headdim",
    "llama-linear",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "gemma3-linear",
    "phi3",
    "phi3-longrope",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_folder(tiny_model: TinyModelFactory, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`hf_folder(kind)` -> the tiny folder, made expressible in GGUF.

    GGUF has no key for Gemma's query_pre_attn_scalar: llama.cpp scales queries by head_dim (by
    hidden/heads for the 27B models), as every Gemma 2/3 checkpoint but the 27B ones is configured.
    The tiny Gemmas use another value, so their GGUF twins are made from a copy that uses head_dim.
    """
    root = tmp_path_factory.mktemp("gguf-folders")

    def get(kind: str) -> Path:
        folder = tiny_model(kind)
        if not kind.startswith("gemma"):
            return folder
        copy = root / kind
        if not copy.exists():
            shutil.copytree(folder, copy)
            config = json.loads((copy / "config.json").read_text())
            config["query_pre_attn_scalar"] = config["head_dim"]
            (copy / "config.json").write_text(json.dumps(config))
        return copy

    return get


@pytest.fixture(scope="module")
def gguf_files(hf_folder: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`gguf_files(kind, qtype=F32, **export_options)` -> a GGUF exported from `hf_folder(kind)`, cached."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict[str, Path] = {}

    def get(kind: str, qtype: Q = Q.F32, **options: Any) -> Path:
        name = "-".join([kind, qtype.name, *(f"{k}={v}" for k, v in sorted(options.items()))])
        if name not in made:
            made[name] = export_gguf(hf_folder(kind), root / f"{name}.gguf", qtype=qtype, **options)
        return made[name]

    return get


def _ids(vocab: int, n: int = 40, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


_greedy = llmchat_greedy


# --- parity with the Hugging Face folder ------------------------------------------------------------


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_f32_gguf_gives_the_folders_logits_and_tokens(
    kind: str, hf_folder: Callable[[str], Path], gguf_files: Callable[..., Path]
) -> None:
    folder, path = hf_folder(kind), gguf_files(kind)
    ours = llmchat.load(path, device="cpu", dtype="float32")
    reference = llmchat.load(folder, device="cpu", dtype="float32")
    ids = _ids(reference.config.vocab_size)
    diff = (ours.logits(ids) - reference.logits(ids)).abs().max().item()
    assert diff <= TOL, f"{kind}: GGUF logits differ from the folder's by {diff:.2e}"
    prompt = ids[:12]
    assert _greedy(ours, prompt, NEW_TOKENS) == _greedy(reference, prompt, NEW_TOKENS)


@pytest.mark.parametrize("kind", ["llama", "llama3-rope", "qwen3"])
def test_metadata_becomes_the_folders_config(kind: str, tiny_model: TinyModelFactory, gguf_files: Callable) -> None:
    folder = tiny_model(kind)
    config = json.loads((folder / "config.json").read_text())
    raw = GGUFFile(gguf_files(kind)).hf_config()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert raw[key] == config[key], key
    assert raw["num_key_value_heads"] == config["num_key_value_heads"]
    assert raw["max_position_embeddings"] == config["max_position_embeddings"]
    assert raw["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert raw["rms_norm_eps"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)  # stored as float32
    assert raw["tie_word_embeddings"] == config.get("tie_word_embeddings", False)
    assert raw["architectures"] == config["architectures"]
    ours = open_package(gguf_files(kind)).config
    theirs = open_package(folder).config
    assert ours.rope.theta == theirs.rope.theta and ours.head_dim == theirs.head_dim
    if kind == "llama3-rope":
        # llama3 scaling arrives as rope_freqs divisors; together they give the folder's frequencies.
        from llmchat.engine.rope import inverse_frequencies

        assert ours.rope.freq_factors is not None and ours.rope.type == "default"
        mine, _ = inverse_frequencies(ours.rope, ours.head_dim, ours.max_position_embeddings)
        folder_freqs, _ = inverse_frequencies(theirs.rope, theirs.head_dim, theirs.max_position_embeddings)
        torch.testing.assert_close(mine, folder_freqs, rtol=1e-6, atol=0)


def _as_float32(config: Any) -> Any:
    """The config with the values GGUF stores as float32 rounded, and without the EOS list.

    GGUF keeps one EOS id (the tokenizer's) where config.json may list several.
    """
    rope = config.rope
    factors = {
        name: tuple(float(np.float32(f)) for f in getattr(rope, name))
        for name in ("short_factor", "long_factor")
        if getattr(rope, name) is not None
    }
    return config.with_changes(
        rms_norm_eps=float(np.float32(config.rms_norm_eps)),
        rope=dataclasses.replace(rope, **factors),
        eos_token_ids=(),
        dtype=None,
    )


@pytest.mark.parametrize("kind", ["qwen2", "gemma2", "gemma3", "gemma3-linear", "phi3", "phi3-longrope"])
def test_gguf_config_equals_the_folders(kind: str, hf_folder: Callable[[str], Path], gguf_files: Callable) -> None:
    """Sliding-window layout, local RoPE, soft-caps, partial rotary, longrope: all survive the trip."""
    ours = open_package(gguf_files(kind)).config
    theirs = open_package(hf_folder(kind)).config
    assert _as_float32(ours) == _as_float32(theirs)


@pytest.mark.parametrize(
    ("kind", "qtype"),
    [("llama", Q.Q8_0), ("llama-bias", Q.Q4_1), ("qwen3", Q.Q5_0)],
    ids=["llama-Q8_0", "llama-bias-Q4_1", "qwen3-Q5_0"],
)
def test_quantized_gguf_is_the_folder_with_quantized_weights(
    kind: str, qtype: Q, tiny_model: TinyModelFactory, gguf_files: Callable, tmp_path: Path
) -> None:
    path = gguf_files(kind, qtype)
    package = open_package(path)
    assert package.quantization == qtype.name
    reference = llmchat.load(quantized_copy(tiny_model(kind), tmp_path / "rt", qtype), device="cpu", dtype="float32")
    ours = llmchat.load(path, device="cpu", dtype="float32", packed=False)  # the exact float reference
    ids = _ids(reference.config.vocab_size)
    diff = (ours.logits(ids) - reference.logits(ids)).abs().max().item()
    assert diff <= TOL, f"{kind} {qtype.name}: logits differ by {diff:.2e}"
    plain = llmchat.load(tiny_model(kind), device="cpu", dtype="float32")
    assert (plain.logits(ids) - ours.logits(ids)).abs().max().item() > 1e-3, "the weights were not quantized"


def test_tensors_dequantize_like_gguf_py(gguf_files: Callable, tmp_path: Path) -> None:
    """Every supported type (K-quants included, as random blocks) reads back as gguf-py dequantizes it."""
    types_ = sorted(SUPPORTED_TYPES)
    path = write_typed_tensors(tmp_path / "types.gguf", types_)
    ours = GGUFFile(path)
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == len(types_)
    for info in reader.tensors:
        with np.errstate(all="ignore"):  # random bytes make NaN/inf scales
            expected = torch.from_numpy(np.array(gguf.quants.dequantize(info.data, info.tensor_type)))
            got = ours.read_tensor(info.name)
        assert got.dtype == torch.float32 and got.shape == (2, 256), info.tensor_type.name
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=info.tensor_type.name)
    # The served weights of a Q4_1 export: un-permuted llama tensors aside, exactly gguf-py's values.
    q41 = gguf.GGUFReader(gguf_files("llama", Q.Q4_1))
    down = next(t for t in q41.tensors if t.name == "blk.1.ffn_down.weight")
    served = dict(open_package(gguf_files("llama", Q.Q4_1)).weights.tensors())
    expected = torch.from_numpy(gguf.quants.dequantize(down.data, down.tensor_type))
    assert torch.equal(served["model.layers.1.mlp.down_proj.weight"], expected)


# --- the token embedding, read from the file ---------------------------------------------------------


def test_mapped_rows_are_the_files_values_for_every_type(tmp_path: Path) -> None:
    """Rows gathered from the map (any ids, repeated, in any order, in one pass) are bit for bit the
    rows of the whole tensor as read_tensor dequantizes it (gguf-py's values), for every supported
    type; the map stays valid after the file is replaced on disk (a model updated in place)."""
    from llmchat.engine.gguf_tensors import GGUFEmbedding

    types_ = sorted(SUPPORTED_TYPES)
    path = write_typed_tensors(tmp_path / "types.gguf", types_, rows=64)
    file = GGUFFile(path)
    ids = torch.tensor([63, 0, 5, 5, 17, 62, 1])
    embeddings = {}
    for info in file.tensor_info.values():
        with np.errstate(all="ignore"):  # random bytes make NaN/inf scales
            whole = file.read_tensor(info.name)
        embedding = GGUFEmbedding(path, info, torch.device("cpu"), torch.float32)
        got = embedding(ids)
        assert got.shape == (len(ids), 256) and got.dtype == torch.float32, info.type.name
        torch.testing.assert_close(got, whole[ids], rtol=0, atol=0, equal_nan=True, msg=info.type.name)
        assert not list(embedding.parameters()) and not list(embedding.buffers())  # nothing resident
        embeddings[info.name] = (embedding, whole)
    replacement = tmp_path / "new.gguf"
    replacement.write_bytes(b"GGUF" + bytes(path.stat().st_size - 4))
    os.replace(replacement, path)
    for embedding, whole in embeddings.values():
        torch.testing.assert_close(embedding(ids), whole[ids], rtol=0, atol=0, equal_nan=True)
    with pytest.raises(IndexError):
        embedding(torch.tensor([64]))
    with pytest.raises(IndexError):  # numpy would wrap a negative index around
        embedding(torch.tensor([-1]))


def test_mapped_rows_leave_no_pages_resident(tmp_path: Path) -> None:
    """Touching a row maps the pages around it (the kernel's fault-around); the embedding gives them
    back after each gather, so a process that has read every row holds none of the file."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc to read file-backed RSS")
    from llmchat.engine.gguf_tensors import GGUFEmbedding

    def rss_file() -> int:
        text = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("RssFile:"))) * 1024

    path = write_typed_tensors(tmp_path / "wide.gguf", [Q.F32], columns=1024, rows=8192)  # 32 MiB of rows
    file = GGUFFile(path)
    (info,) = file.tensor_info.values()
    path.read_bytes()  # in the page cache, as after a load that read the file
    embedding = GGUFEmbedding(path, info, torch.device("cpu"), torch.float32)
    before = rss_file()
    for begin in range(0, 8192, 512):  # every row, a prefill chunk at a time
        embedding(torch.randperm(8192, generator=torch.Generator().manual_seed(begin))[:512])
    assert rss_file() - before < 2 * 1024**2, "the rows' pages stayed mapped"


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
@pytest.mark.parametrize("kind", ["llama", "llama-tied"])
def test_embedding_is_read_from_the_file_with_the_float_references_values(
    kind: str, qtype: Q, gguf_files: Callable
) -> None:
    """Loaded by default, a GGUF's token embedding is read from the file wherever it would be a copy
    of its own (untied, or tied to a packed output matrix) and gives exactly the float reference's
    embedding (`--dequantize`: the dequantized tensor, resident); an untied one is never loaded."""
    from llmchat.engine.gguf import GGUFFile as File
    from llmchat.engine.gguf_tensors import GGUFEmbedding
    from llmchat.engine.packed import PackedLinear

    path = gguf_files(kind, qtype)
    reads: list[str] = []
    original = File.read_tensor

    def spy(self: File, name: str) -> torch.Tensor:
        reads.append(name)
        return original(self, name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(File, "read_tensor", spy)
        model = llmchat.load(path, device="cpu", dtype="float32")
    reference = llmchat.load(path, device="cpu", dtype="float32", packed=False)
    tied = model.config.tie_word_embeddings
    assert tied == (kind == "llama-tied")
    mapped = not tied or isinstance(model.model.lm_head, PackedLinear)
    assert isinstance(model.model.embed, GGUFEmbedding) == mapped
    assert not isinstance(reference.model.embed, GGUFEmbedding)
    assert ("token_embd.weight" in reads) == tied  # tied: read for the output projection only
    ids = torch.tensor(_ids(model.config.vocab_size, 24) + [0, model.config.vocab_size - 1])
    with torch.inference_mode():
        assert torch.equal(model.model.embed_tokens(ids), reference.model.embed_tokens(ids))


def test_embedding_read_from_the_file_gets_gemmas_scale(gguf_files: Callable) -> None:
    """Gemma scales its embedding by sqrt(hidden): rows read from the file are scaled like the
    resident ones, in float32 and in bfloat16."""
    from llmchat.engine.gguf_tensors import GGUFEmbedding

    path = gguf_files("gemma3")
    file = GGUFFile(path)
    ids = torch.tensor(_ids(file.model_config().vocab_size, 16))
    for dtype in (torch.float32, torch.bfloat16):
        reference = llmchat.load(path, device="cpu", dtype=dtype, packed=False).model
        resident = reference.embed_tokens(ids)
        reference.embed = GGUFEmbedding(path, file.tensor_info["token_embd.weight"], torch.device("cpu"), dtype)
        mapped = reference.embed_tokens(ids)
        assert mapped.dtype == dtype and torch.equal(mapped, resident)
        assert not torch.equal(mapped, reference.embed(ids))  # the scale applies


@pytest.mark.parametrize("kind", ["llama", "llama-tied"])
def test_packed_model_holds_no_embedding_and_the_bill_says_so(
    kind: str, gguf_files: Callable, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tied packed model keeps no copy of the embedding beside the output projection's product
    matrices (with llmchat's kernel, its int8 codes themselves; else FBGEMM's matrices and no codes), an
    untied one no float embedding; `vram` bills exactly the tensors held and names the mapped bytes,
    `info` says where the rows come from."""

    from llmchat.cli import main
    from llmchat.engine.gguf_tensors import GGUFEmbedding
    from llmchat.engine.memory import module_bytes

    path = gguf_files(kind, Q.Q8_0)
    model = llmchat.load(path, device="cpu", dtype="float32", context_length=64)
    config = model.config
    embedding = model.model.embed
    assert isinstance(embedding, GGUFEmbedding) and module_bytes(embedding) == 0
    held = {name: t for name, t in [*model.model.named_parameters(), *model.model.named_buffers()]}
    assert not any(name.startswith("embed") for name in held)
    shape = (config.vocab_size, config.hidden_size)
    product = "lm_head.codes" if q4kernel.available() is not None else "lm_head.rest"
    # the output projection's product matrix is the one matrix of that shape (FBGEMM's are opaque)
    of_that_shape = [name for name, t in held.items() if tuple(t.shape) in (shape, shape[::-1])]
    assert of_that_shape == [product]
    embedding_bytes = GGUFFile(path).tensor_info["token_embd.weight"].n_bytes
    assert model.info.mapped_embedding == embedding_bytes
    assert main(["vram", str(path), "--device", "cpu", "--context", "64", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["estimates"]
    assert row["weights"] == model.weights_bytes() and row["mapped"] == embedding_bytes
    assert main(["vram", str(path), "--device", "cpu", "--context", "64"]) == 0
    assert f"token embedding: {embedding_bytes / 1024**2:.1f} MiB of the file, mapped" in capsys.readouterr().out
    assert main(["vram", str(path), "--device", "cpu", "--context", "64", "--dequantize", "--json"]) == 0
    (float_row,) = json.loads(capsys.readouterr().out)["estimates"]
    reference = llmchat.load(path, device="cpu", dtype="float32", context_length=64, packed=False)
    assert float_row["mapped"] == 0 and float_row["weights"] == reference.weights_bytes()
    assert main(["info", str(path)]) == 0
    assert "token embedding read from the file on demand" in capsys.readouterr().out


def test_package_describes_the_file(gguf_files: Callable) -> None:
    path = gguf_files("llama", Q.Q8_0)
    package = open_package(path)
    assert package.format == "gguf" and package.name == path.stem and package.path == path
    assert package.size_bytes == path.stat().st_size
    assert package.templates is not None and package.templates.templates == {"default": CHATML_TEMPLATE}
    assert package.special_tokens["bos_token"] == BOS and package.special_tokens["eos_token"] == IM_END
    assert package.tokenizer.eos_token_id in package.eos_token_ids
    by_type = GGUFFile(path).tensor_bytes_by_type()
    reader = gguf.GGUFReader(path)
    expected: dict[str, int] = {}
    for info in reader.tensors:
        block, size = gguf.GGML_QUANT_SIZES[info.tensor_type]
        expected[info.tensor_type.name] = expected.get(info.tensor_type.name, 0) + info.n_elements // block * size
    assert by_type == expected and set(by_type) == {"Q8_0", "F32"}
    assert sum(by_type.values()) < package.size_bytes


# --- bad files --------------------------------------------------------------------------------------


def _load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as caught:
        llmchat.load(path, device="cpu", dtype="float32")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    return message


@pytest.mark.parametrize("keep", [0.5, 0.02, 6])
def test_truncated_gguf(keep: float, gguf_files: Callable, tmp_path: Path) -> None:
    data = gguf_files("llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    assert "truncated" in _load_error(cut)


def test_not_a_gguf_file(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    shutil.copy(tiny_model("llama") / "model.safetensors", fake)
    assert "not a GGUF file" in _load_error(fake)


def test_unsupported_gguf_version(gguf_files: Callable, tmp_path: Path) -> None:
    data = bytearray(gguf_files("llama").read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    future = tmp_path / "future.gguf"
    future.write_bytes(bytes(data))
    assert "GGUF version 7 is not supported" in _load_error(future)


def test_unsupported_architecture(gguf_files: Callable) -> None:
    message = _load_error(gguf_files("llama", architecture="mamba"))
    assert "'mamba'" in message and "llama" in message and "qwen3" in message


def test_unsupported_tensor_type(gguf_files: Callable) -> None:
    path = gguf_files("llama", raw_types={"blk.1.attn_v.weight": Q.IQ2_XXS})
    message = _load_error(path)
    assert "IQ2_XXS" in message and "blk.1.attn_v.weight" in message


def test_vocab_only_gguf_opens_but_does_not_load(gguf_files: Callable) -> None:
    path = gguf_files("qwen2", vocab_only=True)
    package = open_package(path)
    assert package.templates is not None and package.tokenizer.decode(package.tokenizer.encode("the fox")) == "the fox"
    assert package.config.vocab_size == package.tokenizer.vocab_size
    assert "vocab-only GGUF has no weights" in _load_error(path)


def _assert_one_line_error(code: int, stderr: str, path: Path) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmchat: error: "), stderr
    assert path.name in lines[0]


def test_cli_reports_a_truncated_gguf_in_one_line(gguf_files: Callable, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_files("llama").read_bytes()[:1000])
    result = subprocess.run(
        [sys.executable, "-m", "llmchat", "run", str(path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_line_error(result.returncode, result.stderr, path)


@pytest.mark.parametrize("case", ["mamba", "iq2_xxs", "vocab-only"])
def test_cli_reports_bad_gguf_in_one_line(case: str, gguf_files: Callable, capsys: pytest.CaptureFixture[str]) -> None:
    from llmchat.cli import main

    if case == "mamba":
        path = gguf_files("llama", architecture="mamba")
    elif case == "iq2_xxs":
        path = gguf_files("llama", raw_types={"blk.1.attn_v.weight": Q.IQ2_XXS})
    else:
        path = gguf_files("qwen2", vocab_only=True)
    code = main(["run", str(path), "--prompt", "hi", "--device", "cpu"])
    _assert_one_line_error(code, capsys.readouterr().err, path)


# --- the real demo model ----------------------------------------------------------------------------

PROMPTS = {"english": "What is the capital of France?", "chinese": "法国的首都是哪里？"}


@pytest.mark.parametrize(
    ("kind", "qtype", "layout"),
    [("llama", Q.Q4_1, "int4"), ("qwen2", Q.Q4_0, "int4"), ("llama-tied", Q.Q8_0, "int8"), ("gemma3", Q.Q5_0, "int8")],
)
def test_quantized_gguf_stays_packed_on_cpu(kind: str, qtype: Q, layout: str, gguf_files: Callable) -> None:
    """By default a quantized GGUF keeps its matrices packed: a fraction of the float bytes, and the
    same model — logits close to the dequantized float32 reference's, greedy picks it agrees with."""
    path = gguf_files(kind, qtype)
    packed = llmchat.load(path, device="cpu", dtype="float32")
    plain = llmchat.load(path, device="cpu", dtype="float32", packed=False)
    assert f"{qtype.name} → {layout}" in packed.info.packing and plain.info.packing == "float"
    from llmchat.engine.checkpoint import packing_plan
    from llmchat.engine.model import Linear
    from llmchat.engine.packed import OUTPUT_LAYOUT, PackedLinear

    # Every projection the file stores quantized is packed; the rest (tiny shapes the exporter
    # kept as floats) and untied embeddings stay float.
    plan = packing_plan(open_package(path).weights.quantized_types(), plain.config)
    names = {n + ".weight" for n, m in packed.model.named_modules() if isinstance(m, PackedLinear)}
    assert names and names == set(plan)
    assert all(f"{n}.weight" not in plan for n, m in packed.model.named_modules() if isinstance(m, Linear))
    assert packed.weights_bytes() < plain.weights_bytes()
    ids = _ids(plain.config.vocab_size)
    ours, reference = packed.logits(ids), plain.logits(ids)
    if "lm_head.weight" in plan:  # whatever its type, the output projection gives float32 logits
        assert packed.model.lm_head.layout == OUTPUT_LAYOUT
    assert (ours != ours.bfloat16().float()).float().mean() > 0.9
    # bfloat16 activations and int8 rows requantized from Q8_0 blocks: on these random tiny models the
    # worst logit misses by 2-5% of the largest (ids of other seeds, either kind of output matrix), the
    # typical one by well under 1%; a wrong code order, scale or group misses by the whole range.
    error = (ours - reference).abs()
    assert error.max().item() < 0.06 * reference.abs().max().item()
    assert error.mean().item() < 0.01 * reference.abs().max().item()
    agree = (ours.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"argmax agrees on {agree:.0%} of positions"
    # Greedy on the packed path picks, at every step, a token the float reference ranks within the
    # packed path's own logit error of its best (the exact pick where two candidates are closer than
    # that depends on the CPU's kernels, so it is not asserted).
    prompt = ids[:8]
    tokens = _greedy(packed, prompt, 8)
    sequence = prompt + tokens
    ours, reference = packed.logits(sequence)[len(prompt) - 1 : -1], plain.logits(sequence)[len(prompt) - 1 : -1]
    miss = (ours - reference).abs().amax(-1)
    shortfall = reference.amax(-1) - reference[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert (shortfall <= 2 * miss).all(), (shortfall, miss)
    assert (ours.argmax(-1) == torch.tensor(tokens)).all()  # and greedy is the argmax of its own logits


@pytest.mark.parametrize("kind", ["llama-bias", "llama-tied"])
def test_packed_models_load_from_the_cache_the_second_time(kind: str, gguf_files: Callable, tmp_path: Path) -> None:
    """The second load of a GGUF reads the packed model back (no packing) with identical logits; a
    damaged cache file is dropped and rebuilt; a changed source file gets a new cache entry. The
    cache holds no token embedding: both loads read its rows from the GGUF."""
    from llmchat.engine.gguf_tensors import GGUFEmbedding
    from llmchat.engine.packed import PackedLinear

    path = tmp_path / "model.gguf"
    shutil.copy(gguf_files(kind, Q.Q4_1), path)
    cache = tmp_path / "packed"
    first = llmchat.load(path, device="cpu", dtype="float32", cache_dir=cache)
    files = list(cache.glob("*.safetensors"))
    assert not first.info.from_cache and len(files) == 1
    stored = load_file(str(files[0]))
    assert not [key for key in stored if key.startswith("embed")]
    assert stored["lm_head.codes"].dtype == torch.int8  # the output projection's, to rebuild it from
    del stored  # views of a map of the file
    with pytest.MonkeyPatch.context() as patch:  # restoring never takes the codes back from the matrices
        patch.setattr(PackedLinear, "_output_codes", lambda self: pytest.fail("restore unpacked the output matrix"))
        second = llmchat.load(path, device="cpu", dtype="float32", cache_dir=cache)
    assert second.info.from_cache and second.info.packing == first.info.packing
    assert isinstance(second.model.embed, GGUFEmbedding) and second.info.mapped_embedding > 0
    maps = Path("/proc/self/maps")
    if maps.is_file():  # the tensors were read, not left as views of a map of the file (which kept
        assert str(files[0]) not in maps.read_text()  # the dropped output codes' pages resident)
    # the codes are the product matrix with llmchat's kernel, else they only rebuilt FBGEMM's matrices
    assert ("codes" in dict(second.model.lm_head.named_buffers())) == (q4kernel.available() is not None)
    ids = _ids(first.config.vocab_size)
    assert torch.equal(first.logits(ids), second.logits(ids))
    assert _greedy(second, ids[:8], 6) == _greedy(first, ids[:8], 6)

    files[0].write_bytes(files[0].read_bytes()[:1000])  # a crash mid-write, a full disk
    third = llmchat.load(path, device="cpu", dtype="float32", cache_dir=cache)
    assert not third.info.from_cache and torch.equal(third.logits(ids), first.logits(ids))
    assert llmchat.load(path, device="cpu", dtype="float32", cache_dir=cache).info.from_cache

    path.touch()  # a re-downloaded or edited file: its old cache entry no longer applies
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert not llmchat.load(path, device="cpu", dtype="float32", cache_dir=cache).info.from_cache
    assert len(list(cache.glob("*.safetensors"))) == 1  # the stale entry went when the new one came
    other = tmp_path / "other" / "model.gguf"  # same file name elsewhere: its own entry, both kept
    other.parent.mkdir()
    shutil.copy(path, other)
    assert not llmchat.load(other, device="cpu", dtype="float32", cache_dir=cache).info.from_cache
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert not list(cache.glob(".tmp-*")), "no temporary files left behind"


def test_the_packed_cache_entry_is_found_in_every_process(gguf_files: Callable, tmp_path: Path) -> None:
    """A matrix fused from two quantized types (Gemma 3's Q5_0 q/k with a Q8_0 v) is named the same in
    every process: the plan's sets of types once made the name follow Python's hash seed, so every
    other `llmchat run` packed the model again."""
    path = gguf_files("llama", Q.Q5_0, raw_types={"blk.0.attn_v.weight": Q.Q8_0})
    script = (
        "import sys, torch; from pathlib import Path; from llmchat.engine.package import open_package; "
        "from llmchat.engine.packed_cache import cache_file; from llmchat.engine.runtime import packing_for; "
        "package = open_package(sys.argv[1]); plan = packing_for(package, torch.device('cpu'), torch.float32); "
        "assert any(len(sources) == 2 for _, sources in plan.values()), plan; "
        "print(cache_file(package.path, Path(sys.argv[2]), plan).name)"
    )
    names = set()
    for seed in range(4):
        result = subprocess.run(
            [sys.executable, "-c", script, str(path), str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        )
        assert result.returncode == 0, result.stderr
        names.add(result.stdout.strip())
    assert len(names) == 1, names


DEMO_TOKENS = 16


@pytest.fixture(scope="module")
def demo_folder() -> Path:
    from tests.demo_model import DemoModelUnavailable, demo_hf_folder

    try:
        return demo_hf_folder()
    except DemoModelUnavailable as error:
        pytest.skip(f"demo model unavailable: {error}")


@pytest.fixture(scope="module")
def demo_models(demo_gguf: Path, demo_folder: Path) -> tuple[Any, Any]:
    """llmchat on the GGUF and on the float32 folder transformers made from it."""
    return (
        llmchat.load(demo_gguf, device="cpu", dtype="float32", context_length=256, packed=False),
        llmchat.load(demo_folder, device="cpu", dtype="float32", context_length=256),
    )


@pytest.fixture(scope="module")
def demo_reference(demo_folder: Path) -> dict[str, dict[str, Any]]:
    """Transformers on the folder: each prompt's ids and its greedy continuation."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # exactly DEMO_TOKENS tokens
    result = {}
    for name, prompt in PROMPTS.items():
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tensor = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(
                tensor,
                attention_mask=torch.ones_like(tensor),
                do_sample=False,
                max_new_tokens=DEMO_TOKENS,
                pad_token_id=tokenizer.pad_token_id,
            )
        result[name] = {"text": text, "ids": ids, "greedy": out[0, len(ids) :].tolist()}
    return result


@pytest.mark.slow
def test_demo_gguf_logits_match_the_folder(demo_models: tuple[Any, Any], demo_reference: dict) -> None:
    ours, folder = demo_models
    assert ours.package.quantization == "Q4_1" and ours.config.vocab_size == folder.config.vocab_size
    for name, reference in demo_reference.items():
        ids = reference["ids"]
        diff = (ours.logits(ids) - folder.logits(ids)).abs().max().item()
        assert diff <= TOL, f"{name}: GGUF logits differ from the folder's by {diff:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROMPTS))
def test_demo_gguf_greedy_matches_transformers(name: str, demo_models: tuple[Any, Any], demo_reference: dict) -> None:
    ours, _ = demo_models
    reference = demo_reference[name]
    assert len(reference["greedy"]) == DEMO_TOKENS
    assert _greedy(ours, reference["ids"], DEMO_TOKENS) == reference["greedy"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROMPTS))
def test_demo_gguf_renders_and_tokenizes_like_transformers(
    name: str, demo_models: tuple[Any, Any], demo_reference: dict
) -> None:
    ours, _ = demo_models
    reference = demo_reference[name]
    text = ours.template.render([{"role": "user", "content": PROMPTS[name]}], add_generation_prompt=True)
    assert text == reference["text"]
    assert ours.tokenizer.encode(text) == reference["ids"]


def test_template_command_renders_a_gguf_like_its_folder(
    hf_folder: Callable[[str], Path], gguf_files: Callable[..., Path], tmp_path: Path
) -> None:
    """`llmchat template FILE.gguf` reads the template from the metadata: same text as the folder's."""
    from llmchat.cli import main

    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "Hi there"}]), encoding="utf-8")
    outputs = []
    for model in (hf_folder("qwen2"), gguf_files("qwen2")):
        out = tmp_path / f"{model.name}.json"
        with open(out, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
            assert main(["template", str(model), "--messages", str(messages), "--json"]) == 0
        outputs.append(json.loads(out.read_text(encoding="utf-8"))["text"])
    assert outputs[0] == outputs[1]
    assert "Hi there" in outputs[1] and outputs[1].endswith("<|im_start|>assistant\n")
