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
    # raw: the system prompt is plain text on a line before the prompt (as in the chat's completion mode)
    code, out, _ = run_cli(
        capsys, "run", folder, "--prompt", "x", "--raw", "--system", "be brief", "--max-new-tokens", "1", "--json"
    )
    assert code == 0
    done = next(json.loads(line) for line in out.splitlines() if json.loads(line)["event"] == "PrefillDone")
    from llmchat.engine.package import open_tokenizer

    assert done["prompt_tokens"] == len(open_tokenizer(folder).encode("be brief\nx", add_special_tokens=True))


def test_tokenize_matches_the_tokenizers_library(
    capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path
) -> None:
    text = "The quick brown fox, 42 times!\n  indented"
    reference = HFTokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False)
    code, out, _ = run_cli(capsys, "tokenize", folder, text, "--json")
    assert code == 0
    texts = [HFTokenizer.from_file(str(folder / "tokenizer.json")).decode([i]) for i in reference.ids]
    assert json.loads(out) == {"ids": reference.ids, "texts": texts, "tokens": reference.tokens}
    source = tmp_path / "input.txt"
    source.write_text(text, encoding="utf-8")
    code, out, _ = run_cli(capsys, "tokenize", folder, "--file", source, "--json")
    assert json.loads(out)["ids"] == reference.ids


def test_tokenize_shows_readable_text_and_the_raw_pieces_on_request(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    """Byte-level pieces ('Ġworld') are the vocabulary's spelling; the table shows what each token
    reads as (' world'), and --raw-pieces adds the piece."""
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    reference = hf.encode("the lazy dog", add_special_tokens=False)
    assert any(piece.startswith("Ġ") for piece in reference.tokens)  # the fixture is byte-level
    code, out, _ = run_cli(capsys, "tokenize", folder, "the lazy dog")
    assert code == 0 and "Ġ" not in out
    rows = out.splitlines()
    assert len(rows) == len(reference.ids)
    for row, token_id in zip(rows, reference.ids, strict=True):
        assert row.split()[1] == str(token_id) and row.endswith(json.dumps(hf.decode([token_id]))), row
    code, out, _ = run_cli(capsys, "tokenize", folder, "the lazy dog", "--raw-pieces")
    for row, piece in zip(out.splitlines(), reference.tokens, strict=True):
        assert row.endswith("  " + json.dumps(piece, ensure_ascii=False)), row


def test_models_add_finds_the_gguf_in_a_folder(
    capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path
) -> None:
    """A folder holding only a .gguf file is that file (add, run, tokenize); several are named."""
    from tests.gguf_export import export_gguf

    holder = tmp_path / "downloaded"
    holder.mkdir()
    gguf = export_gguf(folder, holder / "tiny-qwen.gguf")
    (holder / "README.md").write_text("a model card")
    code, out, err = run_cli(capsys, "models", "add", holder)
    assert code == 0, err
    assert f"added downloaded (the default): {gguf.resolve()}" in out and "tiny-qwen.gguf" in err
    code, out, _ = run_cli(capsys, "models", "list", "--json")
    row = json.loads(out)[0]
    assert row["path"] == str(gguf.resolve()) and row["format"] == "gguf" and row["problem"] is None
    code, out, _ = run_cli(capsys, "tokenize", holder, "the fox", "--json")
    assert code == 0 and json.loads(out)["ids"]
    code, _, err = run_cli(capsys, "run", holder, "--prompt", "the fox", "--max-new-tokens", "2")
    assert code == 0, err

    export_gguf(folder, holder / "tiny-qwen-copy.gguf")
    for args in (["models", "add", holder, "--name", "other"], ["run", holder, "--prompt", "x"]):
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, "several GGUF files", "tiny-qwen.gguf", "tiny-qwen-copy.gguf")


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
    assert_one_line_error(code, err, "--top-p", "(0, 1]")
    code, _, err = run_cli(capsys, "run", folder, "--prompt", "x", "--dtype", "int3")
    assert_one_line_error(code, err, "int3")


_P = ["--prompt", "x"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["run", "M", *_P, "--max-new-tokens", "0"], ["--max-new-tokens", "at least 1, got 0"]),
        (["run", "M", *_P, "--max-new-tokens", "-3"], ["--max-new-tokens", "got -3"]),
        (["run", "M", *_P, "--max-new-tokens", "many"], ["--max-new-tokens", "whole number", "'many'"]),
        (["run", "M", *_P, "--threads", "0"], ["--threads", "at least 1"]),
        (["run", "M", *_P, "--context", "0"], ["--context", "at least 1"]),
        (["run", "M", *_P, "--prefill-chunk", "0"], ["--prefill-chunk", "at least 1"]),
        (["run", "M", *_P, "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["run", "M", *_P, "--min-p", "2"], ["--min-p", "[0, 1]"]),
        (["run", "M", *_P, "--temperature", "-1"], ["--temperature", ">= 0"]),
        (["run", "M", *_P, "--temperature", "nan"], ["--temperature", ">= 0"]),
        (["run", "M", *_P, "--temperature", "hot"], ["--temperature", "a number", "'hot'"]),
        (["run", "M", *_P, "--top-k", "-1"], ["--top-k", ">= 0"]),
        (["run", "M", *_P, "--top-k", "2.5"], ["--top-k", "whole number"]),
        (["run", "M", *_P, "--repetition-penalty", "0"], ["--repetition-penalty", "> 0"]),
        (["run", "M", *_P, "--top-logprobs", "0"], ["--top-logprobs", "at least 1"]),
        (["run", "M", *_P, "--seed", "x"], ["--seed", "whole number"]),
        (["run", "M", *_P, "--raw", "--chat"], ["--chat", "not allowed with argument --raw"]),
        (["run", "M"], ["--prompt", "required"]),
        (["inspect", "M", *_P, "--top-k", "0"], ["--top-k", "at least 1"]),
        (["inspect", "M", *_P, "--sample-top-k", "-1"], ["--sample-top-k", ">= 0"]),
        (["bench", "M", "--prompt-tokens", "-5"], ["--prompt-tokens", "at least 1, got -5"]),
        (["bench", "M", "--gen-tokens", "0"], ["--gen-tokens", "at least 1"]),
        (["bench", "M", "--repeat", "0"], ["--repeat", "at least 1"]),
        (["bench", "M", "--turns", "-1"], ["--turns", "0 or more"]),
        (["bench", "M", "--turn-tokens", "0"], ["--turn-tokens", "at least 1"]),
        (["bench", "M", "--contexts", "256,0"], ["--contexts", "at least 1, got 0"]),
        (["bench", "M", "--contexts", "a,b"], ["--contexts", "whole number"]),
        (["bench", "M", "--contexts", ","], ["--contexts", "comma-separated"]),
        (["bench", "M", "--context-gen-tokens", "0"], ["--context-gen-tokens", "at least 1"]),
        (["bench", "M", "--threads", "0"], ["--threads", "at least 1"]),
        (["perplexity", "M", "--file", "f", "--window", "0"], ["--window", "at least 1"]),
        (["perplexity", "M", "--file", "f", "--max-tokens", "0"], ["--max-tokens", "at least 1"]),
        (["vram", "M", "--context", "0"], ["--context", "at least 1"]),
        (["vram", "M", "--prefill-chunk", "-1"], ["--prefill-chunk", "at least 1"]),
        (["vram", "M", "--kv-dtype", "int3"], ["--kv-dtype", "int3"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens", "at least 1"]),  # the chat's own flags
        (["--context", "0"], ["--context", "at least 1"]),
        (["--threads", "-2"], ["--threads", "at least 1"]),
        (["--temperature", "-0.5"], ["--temperature", ">= 0"]),
        (["--dtype", "int3"], ["--dtype", "int3"]),
    ],
)
def test_bad_values_are_refused_at_the_parser(
    capsys: pytest.CaptureFixture[str], folder: Path, args: list[str], needles: list[str]
) -> None:
    """Every command checks its numbers as it parses them: one line naming the flag, exit code 2,
    and nothing runs (no model loads, the chat does not open)."""
    code, out, err = run_cli(capsys, *[str(folder) if a == "M" else a for a in args])
    assert out == ""
    assert_one_line_error(code, err, *needles)
    assert "usage:" not in err


def test_a_bad_value_end_to_end_is_one_line_without_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "llmchat", "run", "demo", "--prompt", "hi", "--max-new-tokens", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "llmchat: error: argument --max-new-tokens: must be at least 1, got 0 (see `llmchat run --help`)"
    ]


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
