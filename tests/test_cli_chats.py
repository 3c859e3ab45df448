"""`llmchat chats ...` on a real conversation folder (LLMCHAT_DATA_DIR), in a subprocess and in-process.

Each subprocess pays for a fresh interpreter, so the few that matter most (JSON listing, Markdown
export, the no-TTY refusal) run as `python -m llmchat`; the rest call `main()` directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmchat.chat.conversation import Conversation
from llmchat.chat.store import FORMAT, ConversationStore
from llmchat.cli import main

STATS = {"tokens": 17, "ttft_s": 0.25, "prefill_tok_s": 812.5, "decode_tok_s": 33.3, "finish_reason": "eos"}


def sample(title: str, updated: str) -> Conversation:
    """Two answers to one question; the second (current) one has reasoning and stats."""
    conv = Conversation(model={"name": "tiny-qwen"}, system="Be exact.")
    conv.add_user(title)
    conv.add_assistant("first try, discarded")
    retry = conv.regenerate()
    conv.update(retry.id, content="The answer is **42**.", reasoning="Six times seven.", stats=STATS)
    conv.updated = updated
    return conv


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMCHAT_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture()
def saved(data_dir: Path) -> tuple[Conversation, Conversation]:
    store = ConversationStore(data_dir / "conversations")
    old = sample("What is six times seven?", "2024-01-01T00:00:00.000+00:00")
    new = sample("Ultimate question", "2024-06-01T00:00:00.000+00:00")
    store.save(old)
    store.save(new)
    return old, new


def run_subprocess(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMCHAT_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "llmchat", "chats", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["chats", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmchat: error: ") and needle in lines[0], err


# --- through `python -m llmchat` ------------------------------------------------------------------


def test_list_json_in_a_subprocess(data_dir: Path, saved: tuple[Conversation, Conversation]) -> None:
    old, new = saved
    newer = data_dir / "conversations" / "from-the-future.json"
    newer.write_text(json.dumps({"format": FORMAT, "version": 99, "id": "from-the-future"}))
    before = newer.read_bytes()
    result = run_subprocess(data_dir, "list", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [c["id"] for c in data["conversations"]] == [new.id, old.id]
    assert data["conversations"][0] == {
        "id": new.id,
        "title": new.title,
        "model": "tiny-qwen",
        "updated": new.updated,
        "turns": 1,
    }
    assert data["unreadable"] == [{"file": str(newer), "reason": "written by a newer llmchat (version 99)"}]
    assert newer.read_bytes() == before


def test_export_markdown_in_a_subprocess(data_dir: Path, saved: tuple[Conversation, Conversation]) -> None:
    _, new = saved
    result = run_subprocess(data_dir, "export", "last", "--format", "md")
    assert result.returncode == 0, result.stderr
    md = result.stdout
    assert md.startswith(f"# {new.title}\n")
    assert "## System\n\nBe exact." in md
    assert "## User\n\nUltimate question" in md
    assert "<details>\n<summary>Reasoning</summary>\n\nSix times seven.\n\n</details>" in md
    assert "The answer is **42**." in md
    assert "first try" not in md  # only the current branch
    stats_line = next(line for line in md.splitlines() if "tokens" in line)
    assert stats_line.startswith("*") and stats_line.endswith("*")
    for piece in ("17 tokens", "TTFT 0.25 s", "prefill 812.5 tok/s", "decode 33.3 tok/s"):
        assert piece in stats_line
    # Reasoning comes before the answer it led to, and the stats after it.
    assert md.index("Six times seven.") < md.index("The answer is") < md.index("17 tokens")


def test_delete_refuses_without_a_terminal(data_dir: Path, saved: tuple[Conversation, Conversation]) -> None:
    _, new = saved
    result = run_subprocess(data_dir, "delete", "last")
    assert_one_line_error(result.returncode, result.stderr, "--yes")
    assert (data_dir / "conversations" / f"{new.id}.json").is_file()


# --- in-process -------------------------------------------------------------------------------------


def test_show_prints_the_current_branch(capsys: pytest.CaptureFixture[str], saved) -> None:
    old, _ = saved
    code, out, _ = run_main(capsys, "show", old.id)
    assert code == 0
    assert out.splitlines()[0] == f"{old.title}  [{old.id}]"
    assert "What is six times seven?" in out and "The answer is **42**." in out
    assert "(branch 2/2)" in out and "Six times seven." in out
    assert "first try" not in out
    code, out, _ = run_main(capsys, "show", "last", "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["messages"] == [m.to_dict() for m in saved[1].path()]


def test_export_json_writes_the_file_as_stored(
    capsys: pytest.CaptureFixture[str], data_dir: Path, saved, tmp_path: Path
) -> None:
    old, _ = saved
    out_file = tmp_path / "export.json"
    code, _, err = run_main(capsys, "export", old.id, "--format", "json", "--out", str(out_file))
    assert code == 0 and str(out_file) in err
    assert out_file.read_bytes() == (data_dir / "conversations" / f"{old.id}.json").read_bytes()
    assert Conversation.from_dict(json.loads(out_file.read_text(encoding="utf-8"))) == old


def test_rename_search_and_delete(capsys: pytest.CaptureFixture[str], data_dir: Path, saved) -> None:
    old, new = saved
    assert run_main(capsys, "rename", old.id, "Arithmetic")[0] == 0
    code, out, _ = run_main(capsys, "search", "arithMETIC", "--json")
    assert code == 0 and [s["id"] for s in json.loads(out)] == [old.id]
    code, out, _ = run_main(capsys, "search", "ultimate", "--json")
    assert [s["id"] for s in json.loads(out)] == [new.id]
    code, _, _ = run_main(capsys, "delete", "last", "--yes")
    assert code == 0
    code, out, _ = run_main(capsys, "list", "--json")
    assert [(c["id"], c["title"]) for c in json.loads(out)["conversations"]] == [(old.id, "Arithmetic")]


def test_list_text_mentions_unreadable_files(capsys: pytest.CaptureFixture[str], data_dir: Path, saved) -> None:
    broken = data_dir / "conversations" / "broken.json"
    broken.write_text("{not json")
    code, out, _ = run_main(capsys, "list")
    assert code == 0
    assert saved[0].id in out and saved[1].id in out
    assert f"{broken}: not valid JSON" in out


def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    assert_one_line_error(*run_main(capsys, "show", "last")[::2], "no conversations")
    assert_one_line_error(*run_main(capsys, "export", "nope")[::2], "no conversation 'nope'")
    folder = data_dir / "conversations"
    folder.mkdir()
    (folder / "future.json").write_text(json.dumps({"format": FORMAT, "version": 7}))
    assert_one_line_error(*run_main(capsys, "show", "future")[::2], "written by a newer llmchat (version 7)")
    assert_one_line_error(*run_main(capsys, "delete", "future", "--yes")[::2], "will not delete")
    assert (folder / "future.json").is_file()


def test_markdown_puts_the_system_prompt_where_it_was_set(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    conv = Conversation(model={"name": "tiny"})
    for turn in range(1, 5):
        conv.add_user(f"question {turn}")
        conv.add_assistant(f"answer {turn}")
    conv.set_system("Answer in French.")  # set at turn 5
    conv.add_user("question 5")
    conv.add_assistant("réponse 5", stats={"tokens": 2, "finish_reason": "interrupted"})
    conv.set_system("")
    ConversationStore(data_dir / "conversations").save(conv)

    out_file = tmp_path / "chat.md"
    code, _, _ = run_main(capsys, "export", conv.id, "--format", "md", "--out", str(out_file))
    assert code == 0
    md = out_file.read_text(encoding="utf-8")
    assert md.endswith("\n") and not md.endswith("\n\n")
    assert md.index("answer 4") < md.index("## System\n\nAnswer in French.") < md.index("question 5")
    assert md.count("## System") == 2 and md.rstrip().endswith("## System\n\n(system prompt removed)")
    assert "interrupted (the chat closed mid-answer)" in md
    code, stdout, _ = run_main(capsys, "export", conv.id, "--format", "md")
    assert stdout == md

    code, text, _ = run_main(capsys, "show", conv.id)
    assert text.index("answer 4") < text.index("--- system ---\nAnswer in French.") < text.index("question 5")
    code, out, _ = run_main(capsys, "show", conv.id, "--json")
    assert [c["text"] for c in json.loads(out)["system_changes"]] == ["Answer in French.", ""]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [("name", ["x"], "model.name: must be a string, got a list"), ("path", 5, "model.path: must be a string")],
)
def test_resume_of_a_file_with_a_bad_field_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], data_dir: Path, field: str, value: object, reason: str
) -> None:
    """It used to be listed as readable, then `llmchat --resume` crashed with a traceback (exit 0 or 1)."""
    store = ConversationStore(data_dir / "conversations")
    conv = sample("question", "2024-01-01T00:00:00.000+00:00")
    path = store.save(conv)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"][field] = value
    path.write_text(json.dumps(data), encoding="utf-8")
    code = main(["--resume", conv.id])
    _, err = capsys.readouterr()
    assert_one_line_error(code, err, reason)
    code, out, _ = run_main(capsys, "list", "--json")
    [unreadable] = json.loads(out)["unreadable"]
    assert reason in unreadable["reason"]
