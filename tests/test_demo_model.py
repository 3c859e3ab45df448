"""The engine against transformers on the real demo model (SmolLM2-135M-Instruct, dequantized Q4_1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.demo_model import DemoModelUnavailable, check_demo_folder, demo_hf_folder

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 16


@pytest.fixture(scope="session")
def folder() -> Path:
    try:
        return demo_hf_folder()
    except DemoModelUnavailable as error:
        pytest.skip(f"demo model unavailable: {error}")


@pytest.fixture(scope="session")
def reference(folder: Path) -> dict[str, Any]:
    """Transformers on the same folder: rendered prompt, its ids, greedy tokens and their top-2 margins."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model.generation_config.eos_token_id = None  # exactly NEW_TOKENS tokens, like stop_on_eos=False
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),  # else generate masks the <|im_end|> (= pad) tokens
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    top2 = [logits[0].topk(2).values for logits in out.logits]
    return {
        "tokenizer": tokenizer,
        "text": text,
        "ids": ids,
        "greedy": out.sequences[0, len(ids) :].tolist(),
        "margins": [round(float(a - b), 4) for a, b in top2],
    }


@pytest.fixture(scope="session")
def engine(folder: Path) -> Any:
    import llmchat

    return llmchat.load(folder, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def answer(engine: Any, reference: dict[str, Any]) -> list[Any]:
    """The engine's token events for the rendered prompt, greedy, never stopping on EOS."""
    import llmchat
    from llmchat.engine.events import TokenEvent

    text = engine.template.render(MESSAGES, add_generation_prompt=True)
    ids = engine.tokenizer.encode(text)
    events = engine.generate(
        ids, sampling=llmchat.SamplingParams(temperature=0), max_new_tokens=NEW_TOKENS, stop_on_eos=False
    )
    return [event for event in events if isinstance(event, TokenEvent)]


def test_folder_is_a_float32_llama_with_chatml(folder: Path) -> None:
    check_demo_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True


def test_prompt_matches_transformers(engine: Any, reference: dict[str, Any]) -> None:
    text = engine.template.render(MESSAGES, add_generation_prompt=True)
    assert text == reference["text"]
    assert list(engine.tokenizer.encode(text)) == reference["ids"]


def test_greedy_tokens_match_transformers(answer: list[Any], reference: dict[str, Any]) -> None:
    ours = [event.token_id for event in answer]
    theirs = reference["greedy"]
    assert len(theirs) == NEW_TOKENS
    if ours != theirs:
        decode = reference["tokenizer"].decode
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        pytest.fail(
            f"greedy tokens diverge at index {first} (transformers' top-2 logit margin there: "
            f"{reference['margins'][first] if first < NEW_TOKENS else 'n/a'})\n"
            f"ours:         {ours}\n              {decode(ours)!r}\n"
            f"transformers: {theirs}\n              {decode(theirs)!r}"
        )


def test_answer_is_english(answer: list[Any], reference: dict[str, Any]) -> None:
    eos_id = reference["tokenizer"].eos_token_id
    ids = [event.token_id for event in answer]
    end = ids.index(eos_id) if eos_id in ids else len(ids)
    text = "".join(event.text for event in answer[:end])
    assert text == reference["tokenizer"].decode(ids[:end])
    words = text.split()
    assert len(words) >= 2, f"answer too short: {text!r}"
    assert all(word.isascii() for word in words), f"answer is not plain English: {text!r}"
    assert "Paris" in text, f"the demo model should know the capital of France: {text!r}"


@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_vram_prediction_within_15_percent_at_2k(source: str, request: pytest.FixtureRequest) -> None:
    """The memory bill `llmchat vram` predicts is what a fresh process actually uses (peak RSS),
    for the float32 folder and for the Q4_1 GGUF (dequantized at load)."""
    import json
    import subprocess
    import sys

    model = request.getfixturevalue("folder" if source == "folder" else "demo_gguf")

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmchat",
            "vram",
            str(model),
            "--device",
            "cpu",
            "--context",
            "2048",
            "--measure",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    measured = data["measured"]
    assert measured["prefilled"] == 2048
    assert abs(measured["error"]) <= 0.15, measured
    estimate = data["estimates"][0]
    assert measured["tensors"] == estimate["weights"] + estimate["kv_cache"]


def _english_prose() -> Path:
    """A few thousand words of real English that ship with the machine: a license text. numpy's
    own license (a dependency, so always installed) is the last resort."""
    import sysconfig
    from importlib import metadata

    candidates = [
        Path("/usr/share/common-licenses/GPL-3"),
        Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt",
        *(Path(str(f.locate())) for f in metadata.files("numpy") or () if f.name == "LICENSE.txt"),
    ]
    for path in candidates:
        if path.is_file() and path.stat().st_size > 10_000:
            return path
    raise AssertionError(f"none of these license texts is here to score: {candidates}")


def test_packed_weights_keep_perplexity_within_one_percent(demo_gguf: Path) -> None:
    """The fast path (int4/int8 kernels, bfloat16 activations) against the same weights in float32."""
    import llmchat
    from llmchat.engine.perplexity import perplexity

    ids = None
    scores = {}
    for packed in (True, False):
        model = llmchat.load(demo_gguf, device="cpu", dtype="float32", context_length=512, packed=packed)
        if ids is None:
            ids = model.tokenizer.encode(_english_prose().read_text(encoding="utf-8"), add_special_tokens=True)[:2048]
        scores[packed] = perplexity(model.logits, ids, window=512).perplexity
    assert 2 < scores[False] < 200, scores  # a real model on real prose
    assert abs(scores[True] / scores[False] - 1) < 0.01, scores
