"""The headless CLI: real commands on a tiny real model, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from llmchat.cli import main
from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("qwen2", tmp_path_factory.mktemp("cli") / "qwen2")


@pytest.fixture()
def broken(folder: Path, tmp_path: Path) -> Path:
    """A private copy of the model folder that a test may damage."""
    return Path(shutil.copytree(folder, tmp_path / "model"))


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmchat: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- commands that work ---------------------------------------------------------------------------


def test_run_streams_json_events(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    code, out, _ = run_cli(
        capsys, "run", folder, "--prompt", "the fox", "--temperature", "0", "--max-new-tokens", "6", "--json"
    )
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "PrefillProgress" and "PrefillDone" in kinds and kinds[-1] == "Finished"
    tokens = [e for e in events if e["event"] == "TokenEvent"]
    finished = events[-1]
    assert len(tokens) == finished["generated_tokens"] <= 6
    assert all(len(t["top"]) == 5 for t in tokens)
    assert "".join(t["text"] for t in tokens) + finished["tail"] == finished["text"]
    assert finished["prefill_tokens_per_second"] > 0 and finished["ttft_seconds"] > 0


def test_run_plain_text_and_raw(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    code, out, err = run_cli(
        capsys, "run", folder, "--prompt", "the fox", "--raw", "--temperature", "0", "--max-new-tokens", "4"
    )
    assert code == 0 and "tokens, stopped by" in err and "tok/s" in err
    code, _, err = run_cli(capsys, "run", folder, "--prompt", "x", "--raw", "--system", "be brief")
    assert_one_line_error(code, err, "--system")


def test_tokenize_matches_the_tokenizers_library(
    capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path
) -> None:
    text = "The quick brown fox, 42 times!\n  indented"
    reference = HFTokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False)
    code, out, _ = run_cli(capsys, "tokenize", folder, text, "--json")
    assert code == 0
    assert json.loads(out) == {"ids": reference.ids, "tokens": reference.tokens}
    source = tmp_path / "input.txt"
    source.write_text(text, encoding="utf-8")
    code, out, _ = run_cli(capsys, "tokenize", folder, "--file", source, "--json")
    assert json.loads(out)["ids"] == reference.ids


def test_template_prints_exactly_the_rendered_text(
    capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages))
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    code, out, _ = run_cli(capsys, "template", folder, "--messages", path)
    assert code == 0 and out == expected
    code, out, _ = run_cli(capsys, "template", folder, "--messages", path, "--no-generation-prompt")
    assert out == expected.removesuffix("<|im_start|>assistant\n")


def test_template_needs_only_tokenizer_config(capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path) -> None:
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(folder / "tokenizer_config.json", only)
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "user", "content": "x"}]))
    code, out, _ = run_cli(capsys, "template", only, "--messages", path, "--var", "enable_thinking=false")
    assert code == 0 and out == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_bench_reports_the_documented_keys(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    code, out, _ = run_cli(capsys, "bench", folder, "--prompt-tokens", "16", "--gen-tokens", "8", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_memory_bytes", "device", "dtype", "threads"):
        assert key in data, key
    assert data["prefill_tok_s"] > 0 and data["decode_tok_s"] > 0 and data["peak_memory_bytes"] > 0
    assert data["device"] == "cpu" and data["dtype"] == "float32"


def test_bench_turns_reuse_the_cache_and_contexts_sweep(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    """Each turn of the synthetic conversation prefills only its new tokens; the sweep decodes at
    each context length asked for."""
    args = ["--prompt-tokens", "8", "--gen-tokens", "4", "--turns", "3", "--turn-tokens", "6"]
    code, out, _ = run_cli(capsys, "bench", folder, *args, "--contexts", "16,40", "--context-gen-tokens", "3", "--json")
    assert code == 0
    data = json.loads(out)
    turns = data["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3]
    assert [t["prefilled_tokens"] for t in turns] == [6, 6, 6]  # the history came from the cache
    assert [t["reused_tokens"] for t in turns] == [0, 9, 18]  # 6 prompt + 3 fed answer tokens a turn
    assert all(t["ttft_s"] > 0 and t["decode_tok_s"] > 0 for t in turns)
    assert [c["context_tokens"] for c in data["contexts"]] == [16, 40]
    assert all(c["decode_tok_s"] > 0 for c in data["contexts"])
    code, _, err = run_cli(capsys, "bench", folder, "--contexts", "16,x")
    assert_one_line_error(code, err, "--contexts")


def test_perplexity_of_a_text(capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path) -> None:
    """exp of the mean negative log-likelihood of every token after a window's first, from the logits."""
    import math

    import torch

    import llmchat

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6, encoding="utf-8")
    code, out, _ = run_cli(capsys, "perplexity", folder, "--file", text, "--window", "16", "--json")
    assert code == 0
    data = json.loads(out)
    model = llmchat.load(folder, device="cpu", dtype="float32")
    ids = model.tokenizer.encode(text.read_text(), add_special_tokens=True)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, 16):
        chunk = ids[start : start + 16]
        if len(chunk) < 2:
            break
        logprobs = torch.log_softmax(model.logits(chunk), dim=-1)
        nll -= sum(logprobs[i, chunk[i + 1]].item() for i in range(len(chunk) - 1))
        count += len(chunk) - 1
    assert data["scored_tokens"] == count
    assert data["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert data["weights"] == "float"
    code, _, err = run_cli(capsys, "perplexity", folder, "--file", tmp_path / "missing.txt")
    assert_one_line_error(code, err, "no such file")


# --- bad input: one line, exit code 2 -----------------------------------------------------------


def test_missing_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "run", tmp_path / "nope", "--prompt", "hi")
    assert_one_line_error(code, err, "no such file or directory")


def test_not_a_model_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "run", tmp_path, "--prompt", "hi")
    assert_one_line_error(code, err, "not a model folder", "config.json")
    afile = tmp_path / "notes.txt"
    afile.write_text("hello")
    code, _, err = run_cli(capsys, "run", afile, "--prompt", "hi")
    assert_one_line_error(code, err, "is a file")


def test_truncated_safetensors(capsys: pytest.CaptureFixture[str], broken: Path) -> None:
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "run", broken, "--prompt", "hi")
    assert_one_line_error(code, err, "model.safetensors", "corrupt or truncated")


def test_garbage_safetensors(capsys: pytest.CaptureFixture[str], broken: Path) -> None:
    (broken / "model.safetensors").write_bytes(b"\x00" * 8 + b"not a header at all")
    code, _, err = run_cli(capsys, "run", broken, "--prompt", "hi")
    assert_one_line_error(code, err, "corrupt or truncated")


def test_unsupported_architecture_names_it_and_lists_supported(
    capsys: pytest.CaptureFixture[str], broken: Path
) -> None:
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "run", broken, "--prompt", "hi")
    assert_one_line_error(code, err, "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_missing_tokenizer(capsys: pytest.CaptureFixture[str], broken: Path) -> None:
    (broken / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "run", broken, "--prompt", "hi")
    assert_one_line_error(code, err, "tokenizer.json")


def test_broken_template(capsys: pytest.CaptureFixture[str], broken: Path) -> None:
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "run", broken, "--prompt", "hi")
    assert_one_line_error(code, err, "template")


def test_template_that_raises_carries_its_message(
    capsys: pytest.CaptureFixture[str], broken: Path, tmp_path: Path
) -> None:
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('System role not supported') }}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "run", broken, "--prompt", "hi")
    assert_one_line_error(code, err, "System role not supported")


def test_prompt_longer_than_the_context(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    code, _, err = run_cli(capsys, "run", folder, "--prompt", "the quick brown fox " * 20, "--context", "16")
    assert_one_line_error(code, err, "context holds 16")


def test_pickle_checkpoints_are_refused(capsys: pytest.CaptureFixture[str], broken: Path) -> None:
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    code, _, err = run_cli(capsys, "run", broken, "--prompt", "hi")
    assert_one_line_error(code, err, "pytorch_model.bin", "arbitrary code")


def test_bad_arguments(capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "template", folder, "--messages", tmp_path / "missing.json")
    assert_one_line_error(code, err, "no such file")
    code, _, err = run_cli(capsys, "run", folder, "--prompt", "x", "--top-p", "0")
    assert_one_line_error(code, err, "top_p")
    code, _, err = run_cli(capsys, "run", folder, "--prompt", "x", "--dtype", "int3")
    assert_one_line_error(code, err, "int3")


def test_errors_never_show_a_traceback_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmchat", "run", str(tmp_path / "absent"), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("llmchat: error: no such file or directory")


def test_config_that_is_not_json(capsys: pytest.CaptureFixture[str], broken: Path) -> None:
    (broken / "config.json").write_text("{ not json")
    code, _, err = run_cli(capsys, "info", broken)
    assert_one_line_error(code, err, "config.json")


def test_missing_shard(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sharded = build_tiny_model("llama", tmp_path / "sharded", sharded=True)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    shards[-1].unlink()
    capsys.readouterr()  # the build's progress bars
    code, _, err = run_cli(capsys, "run", sharded, "--prompt", "hi")
    assert_one_line_error(code, err, "missing", shards[-1].name)


def test_vram_bill_matches_the_loaded_tensors(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    import llmchat

    code, out, _ = run_cli(capsys, "vram", folder, "--device", "cpu", "--context", "64", "--context", "128", "--json")
    assert code == 0
    data = json.loads(out)
    assert [row["context"] for row in data["estimates"]] == [64, 128]
    model = llmchat.load(folder, device="cpu", dtype="float32", context_length=128)
    row = data["estimates"][1]
    assert row["weights"] == model.weights_bytes() and row["kv_cache"] == model.cache.nbytes
    assert row["total"] >= row["weights"] + row["kv_cache"] + row["runtime"]
    code, out, _ = run_cli(capsys, "vram", folder, "--device", "cpu", "--context", "64")
    assert code == 0 and "peak" in out and "64" in out


def test_info_reports_kind_format_and_templates(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    code, out, _ = run_cli(capsys, "info", folder, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model_type"] == "chat" and data["format"] == "safetensors" and data["chat_templates"] == ["default"]
    assert data["file_bytes"] == (folder / "model.safetensors").stat().st_size
    assert data["special_tokens"]["eos_token"] == "<|im_end|>"
