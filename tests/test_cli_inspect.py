"""`llmchat inspect`: per-step next-token data, checked against the engine and an independent forward pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmchat
from llmchat.cli import main
from llmchat.engine.events import Finished
from tests.conftest import TinyModelFactory

PROMPT = "the quick brown fox"


@pytest.fixture()
def folder(tiny_model: TinyModelFactory) -> Path:
    return tiny_model("llama")


def inspect_json(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[list[dict], dict]:
    code = main(["inspect", *(str(a) for a in args), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines and lines[-1]["event"] == "finished"
    assert all(line["event"] == "token" for line in lines[:-1])
    return lines[:-1], lines[-1]


def chat_prompt_ids(model: llmchat.LoadedModel, prompt: str) -> list[int]:
    return model.tokenizer.encode(
        model.template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    )


def test_json_steps_are_consistent_and_match_a_direct_greedy_generation(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    steps, finished = inspect_json(capsys, folder, "--prompt", PROMPT, "--max-new-tokens", "8")
    assert len(steps) == finished["generated_tokens"] > 0
    assert [s["index"] for s in steps] == list(range(len(steps)))
    for step in steps:
        top = step["top"]
        assert len(top) == 5  # the default number of candidates
        assert [t["logit"] for t in top] == sorted((t["logit"] for t in top), reverse=True)
        for p in [step["prob"], step["policy_prob"], *(t["prob"] for t in top), *(t["policy_prob"] for t in top)]:
            assert 0.0 <= p <= 1.0
        same = [t for t in top if t["id"] == step["id"]]
        if same:
            assert same[0]["prob"] == step["prob"] and same[0]["logit"] == step["logit"]
        # greedy by default: the chosen token is the raw argmax, the first candidate, with policy mass 1
        assert step["rank"] == 0 and top[0]["id"] == step["id"] and step["policy_prob"] == 1.0
        assert step["entropy"] >= 0.0 and step["policy_entropy"] == pytest.approx(0.0, abs=1e-6)
        assert step["seconds"] > 0.0

    model = llmchat.load(folder, device="cpu", dtype="float32")
    ids = chat_prompt_ids(model, PROMPT)
    assert finished["prompt_tokens"] == len(ids)
    sampling = model.default_sampling.replace(temperature=0.0)
    done = list(model.generate(ids, sampling=sampling, max_new_tokens=8))[-1]
    assert isinstance(done, Finished)
    assert [s["id"] for s in steps] == list(done.token_ids) == finished["token_ids"]
    assert finished["reason"] == done.reason and finished["text"] == done.text


def test_top_k_sets_the_candidates_per_step(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    steps, _ = inspect_json(capsys, folder, "--prompt", PROMPT, "--max-new-tokens", "6", "--top-k", "3")
    assert steps and all(len(s["top"]) == 3 for s in steps)
    # --top-k is only what is shown; the sampling top-k is --sample-top-k: with it at 1, every
    # candidate but the first has no mass under the policy, even when sampling at temperature 1
    steps, _ = inspect_json(
        capsys, folder, "--prompt", PROMPT, "--max-new-tokens", "4", "--top-k", "3", "--temperature", "1",
        "--sample-top-k", "1", "--top-p", "1", "--min-p", "0",
    )  # fmt: skip
    assert steps and all(len(s["top"]) == 3 for s in steps)
    for step in steps:
        assert [t["policy_prob"] for t in step["top"]][1:] == [0.0, 0.0] and step["rank"] == 0


def test_first_step_entropy_matches_an_independent_forward_pass(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    steps, finished = inspect_json(capsys, folder, "--prompt", PROMPT, "--raw", "--max-new-tokens", "2")
    model = llmchat.load(folder, device="cpu", dtype="float32")
    ids = model.tokenizer.encode(PROMPT, add_special_tokens=True)
    assert finished["prompt_tokens"] == len(ids)
    logits = model.logits(ids)[-1].double()
    p = torch.softmax(logits, dim=-1)
    entropy = float(-(p * torch.log2(p.clamp_min(1e-300))).sum())
    first = steps[0]
    assert first["entropy"] == pytest.approx(entropy, abs=1e-3)
    assert first["id"] == int(logits.argmax())
    assert first["prob"] == pytest.approx(float(p.max()), abs=1e-5)
    assert first["logit"] == pytest.approx(float(logits.max()), abs=1e-3)


def test_human_output_lists_every_token_and_a_summary(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    steps, finished = inspect_json(capsys, folder, "--prompt", PROMPT, "--max-new-tokens", "6")
    code = main(["inspect", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6"])
    out, _ = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("model ") and f"prompt {finished['prompt_tokens']} tokens" in lines[0]
    assert "greedy" in lines[0]
    step_lines = [line for line in lines if " id " in line and " rank " in line]
    assert len(step_lines) == len(steps)
    for line, step in zip(step_lines, steps):
        assert f" id {step['id']} " in line and json.dumps(step["text"], ensure_ascii=False) in line
        assert f"rank {step['rank']}" in line and f"H {step['entropy']:.2f} bits" in line
    assert lines[-1].startswith(f"{len(steps)} tokens, stopped by {finished['reason']}; mean entropy ")
    low = min(steps, key=lambda s: s["prob"])
    assert f"lowest probability {low['prob']:.1%} at step {low['index']}" in lines[-1]


def test_missing_model_is_one_line_and_exit_code_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["inspect", str(tmp_path / "absent"), "--prompt", "hi"])
    _, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("llmchat: error: no such file or directory")
    result = subprocess.run(
        [sys.executable, "-m", "llmchat", "inspect", str(tmp_path / "absent"), "--prompt", "hi", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_values_are_one_line_errors(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    path = folder
    for args, needle in (
        (["--top-k", "0"], "--top-k"),
        (["--sample-top-k", "-1"], "--sample-top-k"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--raw", "--chat"], "not allowed with argument --raw"),
    ):
        code = main(["inspect", str(path), "--prompt", "hi", *args])
        _, err = capsys.readouterr()
        assert code == 2, args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llmchat: error: ") and needle in lines[0], (args, err)
