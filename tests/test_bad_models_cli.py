"""Bad models stay clean end to end (issue 14, item 7): `llmchat run` / `llmchat info` on a broken
MoE folder, a GGUF whose expert count disagrees with its tensors, or a config with a layer type
llmchat does not run, exit 2 with one line `llmchat: error: ...` that names the problem, and no
traceback. Each case runs the real CLI in a subprocess on a tiny model broken in tmp_path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from tests.gguf_export import export_gguf

TinyModelFactory = Callable[..., Path]


def _cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmchat", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, nothing on stdout, exactly one stderr line `llmchat: error: ...` holding every needle."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmchat: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _without(folder: Path, out: Path, drop: Callable[[str], bool]) -> Path:
    """A copy of `folder` whose weights (merged into one file) lack the tensors `drop` names."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors |= {name: handle.get_tensor(name) for name in handle.keys() if not drop(name)}
    assert len(tensors) < sum(1 for _ in _names(folder)), "nothing was dropped"
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _names(folder: Path) -> list[str]:
    names: list[str] = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            names += list(handle.keys())
    return names


def _with_config(folder: Path, out: Path, **changes: Any) -> Path:
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text()) | changes
    (out / "config.json").write_text(json.dumps(config))
    return out


# --- a MoE folder with missing expert tensors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "drop", "needles"),
    [
        # Mixtral's w1/w2/w3 of expert 5 in layer 1: the whole expert is gone from both stacks.
        (
            "mixtral",
            lambda name: ".layers.1.block_sparse_moe.experts.5." in name,
            ["layers.1.mlp.down_exps (expert 5 of 8)", "layers.1.mlp.gate_up_exps (expert 5 of 8)"],
        ),
        # Qwen3-MoE without expert 3's up_proj in layer 0: one half of one fused matrix.
        (
            "qwen3-moe",
            lambda name: name == "model.layers.0.mlp.experts.3.up_proj.weight",
            ["layers.0.mlp.gate_up_exps (expert 3's up_proj of 8)"],
        ),
        # OLMoE's layer 0 keeping only expert 1's gate_proj and down_proj: the first three gaps are named.
        (
            "olmoe",
            lambda name: (
                ".layers.0.mlp.experts." in name and (".experts.1." not in name or name.endswith("up_proj.weight"))
            ),
            [
                "layers.0.mlp.down_exps (expert 0, expert 2, expert 3 and 4 more of 8)",
                "layers.0.mlp.gate_up_exps (expert 0, expert 1's up_proj, expert 2 and 5 more of 8)",
            ],
        ),
    ],
    ids=["mixtral-whole-expert", "qwen3-moe-one-matrix", "olmoe-most-experts"],
)
def test_moe_folder_missing_expert_tensors(
    kind: str, drop: Callable[[str], bool], needles: list[str], tiny_model: TinyModelFactory, tmp_path: Path
) -> None:
    folder = _without(tiny_model(kind), tmp_path / "broken", drop)
    assert_clean_error(_cli("run", folder, "--prompt", "hi"), "checkpoint is missing parts of", *needles)
    # `info` reads no weights, but checks the names as the loader would: the same error
    assert_clean_error(_cli("info", folder), "checkpoint is missing parts of", *needles)


# --- a GGUF whose expert count disagrees with its tensors -----------------------------------------------


@pytest.mark.parametrize("command", ["run", "info"])
def test_gguf_expert_count_disagrees_with_its_tensors(
    command: str, tiny_model: TinyModelFactory, tmp_path: Path
) -> None:
    """The file says 6 experts, its stacks hold 8: refused when opened, by `info` as well."""
    folder = _with_config(tiny_model("qwen3-moe"), tmp_path / "six", num_local_experts=6)
    path = export_gguf(folder, tmp_path / "six.gguf")
    assert gguf.GGUFReader(path).fields["qwen3moe.expert_count"].contents() == 6
    args = ["--prompt", "hi"] if command == "run" else []
    assert_clean_error(
        _cli(command, path, *args), "six.gguf", "qwen3moe.expert_count is 6", "blk.0.ffn_gate_exps.weight", "8 stacked"
    )


def test_gguf_experts_without_an_expert_count(
    tiny_model: TinyModelFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stacked experts in a Mixtral (llama) file that has no llama.expert_count: not read as a dense llama."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_expert_count", lambda self, count: None)
    path = export_gguf(tiny_model("mixtral"), tmp_path / "uncounted.gguf")
    assert "llama.expert_count" not in gguf.GGUFReader(path).fields
    assert_clean_error(
        _cli("run", path, "--prompt", "hi"),
        "uncounted.gguf",
        "_exps.weight holds stacked experts",
        "llama.expert_count",
    )


def test_gguf_missing_an_expert_stack(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    """A layer with a router and gate/down stacks but no up stack."""
    folder = _without(
        tiny_model("mixtral"), tmp_path / "no-up", lambda name: ".layers.1." in name and name.endswith("w3.weight")
    )
    path = export_gguf(folder, tmp_path / "no-up.gguf")
    assert_clean_error(_cli("info", path), "MoE layer 1 has no blk.1.ffn_up_exps.weight")


# --- a layer type llmchat does not run ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "kind", "layer_types", "named"),
    [
        # llama and (without use_sliding_window) Qwen3 read no layer_types at all: checked anyway
        ("run", "llama", ["linear_attention", "full_attention"], "'linear_attention'"),
        ("info", "qwen3", ["full_attention", "mamba"], "'mamba'"),
        ("run", "qwen3-moe", ["full_attention", "linear_attention", "full_attention"], "'linear_attention'"),
        ("info", "gemma3", ["sliding_attention", "mamba", "full_attention"], "'mamba'"),
    ],
)
def test_unknown_layer_type(
    command: str, kind: str, layer_types: list[str], named: str, tiny_model: TinyModelFactory, tmp_path: Path
) -> None:
    folder = _with_config(tiny_model(kind), tmp_path / "model", layer_types=layer_types)
    args = ["--prompt", "hi"] if command == "run" else []
    result = _cli(command, folder, *args)
    assert_clean_error(result, "config.json", "unsupported layer type", named, "supported: full_attention")


def test_layer_types_of_the_wrong_length(tiny_model: TinyModelFactory, tmp_path: Path) -> None:
    folder = _with_config(tiny_model("llama"), tmp_path / "model", layer_types=["full_attention"])
    assert_clean_error(_cli("run", folder, "--prompt", "hi"), "layer_types has 1 entries for 2 layers")
