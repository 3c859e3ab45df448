"""Conversation files: round trip, atomic writes, and files we cannot read left exactly as they are."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmchat.chat.conversation import Conversation
from llmchat.chat.store import FORMAT, VERSION, ConversationStore, StoreError


def rich_conversation(title_text: str = "Tell me about café Ünïcode", updated: str | None = None) -> Conversation:
    """Every optional field set, several branches, non-ASCII text."""
    conv = Conversation(model={"name": "tiny-qwen", "path": "/models/tiny", "format": "safetensors"})
    conv.sampling = {"temperature": 0.7, "top_k": 40, "seed": 1}
    conv.system = "You are terse."
    conv.add_user(title_text)
    answer = conv.add_assistant()
    conv.append(answer.id, "Café ", reasoning="<the user wants> ")
    conv.append(answer.id, "au lait ☕", reasoning="a drink")
    conv.update(
        answer.id,
        stats={"tokens": 2, "ttft_s": 0.05, "prefill_tok_s": 900.0, "decode_tok_s": 40.0, "finish_reason": "eos"},
        tokens=[
            {"id": 5, "text": "Café", "prob": 0.5, "rank": 0, "top": [[5, "Café", 3.0, 0.5], [9, "Tea", 2.0, 0.2]]},
            {"id": 6, "text": " au lait ☕", "prob": 0.9, "rank": 0, "top": [[6, " au lait ☕", 5.0, 0.9]]},
        ],
    )
    conv.regenerate()
    conv.append(conv.current or "", "Espresso")
    conv.add_user("weather?")
    conv.add_assistant("", tool_calls=[{"type": "function", "function": {"name": "w", "arguments": {}}}])
    conv.add_tool("sunny")
    conv.add_assistant("Sunny.")
    if updated:
        conv.updated = updated
    return conv


def tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".json"))


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "conversations")
    conv = rich_conversation()
    path = store.save(conv)
    assert path == tmp_path / "conversations" / f"{conv.id}.json"
    loaded = store.load(conv.id)
    assert loaded == conv
    assert loaded.to_dict() == conv.to_dict()
    assert [m.content for m in loaded.path()] == [m.content for m in conv.path()]
    data = json.loads(path.read_text(encoding="utf-8"))
    assert list(data)[:2] == ["format", "version"]
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert set(data) == {
        "format", "version", "id", "title", "created", "updated", "model", "sampling", "system", "messages", "current",
        "mode",
    }  # fmt: skip
    assert data["current"] == conv.current and len(data["messages"]) == len(conv.messages)
    assert "Ünïcode" in path.read_text(encoding="utf-8")  # stored as text, not \u escapes


def test_save_leaves_no_temp_files_and_replaces_the_old_version(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    conv = rich_conversation()
    store.save(conv)
    conv.add_user("one more")
    store.save(conv)
    assert tmp_files(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == [f"{conv.id}.json"]
    assert store.load(conv.id).path()[-1].content == "one more"


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    conv = rich_conversation()
    path = store.save(conv)
    before = path.read_bytes()
    # Not JSON-serializable, and deep enough that part of the file is already written when it fails.
    conv.update(conv.current or "", stats={"tokens": 1, "bad": object()})
    with pytest.raises(StoreError, match="cannot save"):
        store.save(conv)
    assert path.read_bytes() == before
    assert tmp_files(tmp_path) == []


BAD_FILES = {
    "corrupt": (b'{"format": "llmchat.conversation", "version": 1, "id": ', "not valid JSON"),
    "newer": (None, "written by a newer llmchat (version 2)"),
    "foreign": (b'{"format": "someone.else", "version": 1}', "not an llmchat conversation"),
    "schema": (None, "messages: must be a list, got a string"),
    "list": (b"[1, 2, 3]", "not a JSON object"),
    "binary": (b"\xff\xfe\x00garbage", "cannot read"),
}


def write_bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (content, _) in BAD_FILES.items():
        if content is None:
            data = {"format": FORMAT, **rich_conversation().to_dict(), "id": name}
            data["version"] = VERSION + 1 if name == "newer" else VERSION
            if name == "schema":
                data["messages"] = "oops"
            content = json.dumps(data).encode()
        paths[name] = folder / f"{name}.json"
        paths[name].write_bytes(content)
    return paths


def test_unreadable_files_are_listed_with_reasons_and_never_touched(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    good = rich_conversation()
    store.save(good)
    bad = write_bad_files(tmp_path)
    snapshot = {name: path.read_bytes() for name, path in bad.items()}

    listing = store.list()
    assert [s.id for s in listing.conversations] == [good.id]
    reasons = {u.path.stem: u.reason for u in listing.unreadable}
    assert set(reasons) == set(BAD_FILES)
    for name, (_, needle) in BAD_FILES.items():
        assert needle in reasons[name], (name, reasons[name])

    # Saving over, deleting, renaming or loading any of them is refused with the reason.
    for name in BAD_FILES:
        clash = rich_conversation()
        clash.id = name
        with pytest.raises(StoreError, match="will not overwrite"):
            store.save(clash)
        with pytest.raises(StoreError, match="will not delete"):
            store.delete(name)
        with pytest.raises(StoreError, match=re.escape(BAD_FILES[name][1])):
            store.rename(name, "new title")
    assert {name: path.read_bytes() for name, path in bad.items()} == snapshot
    assert tmp_files(tmp_path) == []


def test_file_whose_id_differs_from_its_name_is_unreadable(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    conv = rich_conversation()
    store.save(conv)
    moved = tmp_path / "copy.json"
    (tmp_path / f"{conv.id}.json").rename(moved)
    listing = store.list()
    assert listing.conversations == []
    assert [(u.path, "does not match the file name" in u.reason) for u in listing.unreadable] == [(moved, True)]


def test_list_is_newest_first_and_last_is_the_newest(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    old = rich_conversation("old chat", updated="2024-01-01T10:00:00.000+00:00")
    new = rich_conversation("new chat", updated="2024-03-01T10:00:00.000+00:00")
    mid = rich_conversation("middle chat", updated="2024-02-01T12:00:00+02:00")
    for conv in (old, new, mid):
        store.save(conv)
    listing = store.list()
    assert [s.title for s in listing.conversations] == ["new chat", "middle chat", "old chat"]
    summary = listing.conversations[0]
    assert (summary.id, summary.model, summary.updated, summary.turns) == (new.id, "tiny-qwen", new.updated, 2)
    last = store.last()
    assert last is not None and last.id == new.id
    assert store.load("last") == new
    assert store.resolve("last") == new.id


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "not-yet")
    assert store.list().conversations == [] and store.list().unreadable == []
    assert store.last() is None
    with pytest.raises(StoreError, match="no conversations"):
        store.load("last")
    with pytest.raises(StoreError, match="no conversation 'abc'"):
        store.load("abc")
    with pytest.raises(StoreError, match="not a conversation id"):
        store.load("../etc/passwd")


def test_search_title_and_content_ignoring_case(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    coffee = rich_conversation("About COFFEE")
    tea = rich_conversation("About tea")
    tea.update(tea.messages[1].id, content="Matcha is a powder")  # the first answer, not on the current branch
    for conv in (coffee, tea):
        store.save(conv)
    assert [s.id for s in store.search("coffee")] == [coffee.id]
    assert [s.id for s in store.search("MATCHA")] == [tea.id]
    assert {s.id for s in store.search("sunny")} == {coffee.id, tea.id}
    assert store.search("nowhere to be found") == []


def test_the_folder_is_read_once_and_then_only_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing after a listing reads no file; a file saved, changed behind the store's back, given a
    journal, or removed is noticed (the chat lists at start and on every Ctrl+O)."""
    import os

    import llmchat.chat.store as store_module

    store = ConversationStore(tmp_path)
    first, second = rich_conversation("first"), rich_conversation("second")
    for conversation in (first, second):
        store.save(conversation)
    reads: list[str] = []
    real_read = store_module.read_conversation
    monkeypatch.setattr(store_module, "read_conversation", lambda path: reads.append(path.stem) or real_read(path))
    assert len(store.list().conversations) == 2 and sorted(reads) == sorted([first.id, second.id])
    reads.clear()
    assert len(store.list().conversations) == 2 and store.search_texts() and reads == []
    first.title = "first, renamed"
    store.save(first)
    assert [s.title for s in store.list().conversations if s.id == first.id] == ["first, renamed"] and reads == [
        first.id
    ]
    reads.clear()
    path = store.path_for(second.id)
    path.write_text("{not json", encoding="utf-8")  # another program wrote it
    os.utime(path, ns=(1, 1))  # even with an old time stamp: the size differs
    listing = store.list()
    assert [u.path for u in listing.unreadable] == [path] and reads == [second.id]
    reads.clear()
    path.unlink()
    journal = store_module.journal_path(store.path_for(first.id))
    journal.write_text("", encoding="utf-8")  # a journal beside it: the file is read again with it
    listing = store.list()
    assert [s.id for s in listing.conversations] == [first.id] and not listing.unreadable and reads == [first.id]


def test_rename_changes_the_title_but_not_the_order(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    conv = rich_conversation(updated="2024-01-01T00:00:00.000+00:00")
    store.save(conv)
    store.rename(conv.id, "  Coffee\n notes ")
    loaded = store.load(conv.id)
    assert loaded.title == "Coffee notes"
    assert loaded.updated == conv.updated
    with pytest.raises(StoreError, match="empty"):
        store.rename(conv.id, "   ")


def test_delete(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path)
    keep, drop = rich_conversation("keep"), rich_conversation("drop")
    store.save(keep)
    store.save(drop)
    assert store.delete(drop.id).title == "drop"
    assert not (tmp_path / f"{drop.id}.json").exists()
    assert [s.id for s in store.list().conversations] == [keep.id]
    with pytest.raises(StoreError, match="no conversation"):
        store.delete(drop.id)


def test_default_folder_follows_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCHAT_DATA_DIR", str(tmp_path))
    assert ConversationStore.default().directory == tmp_path / "conversations"


# --- every field is checked on load --------------------------------------------------------------

# A version 1 file, changed in one field: (change, what the reason names). Each one once crashed the
# chat or a panel later (`"name": ["x"]` reached a border title) instead of being reported here.
FIELD_PROBLEMS = [
    (lambda d: d["model"].update(name=["x"]), "model.name: must be a string, got a list"),
    (lambda d: d["model"].update(path=5), "model.path: must be a string, got an integer"),
    (lambda d: d.update(model=[]), "model: must be an object, got a list"),
    (lambda d: d["sampling"].update(temperature=-0.5), "sampling.temperature: must be greater than or equal to 0"),
    (lambda d: d["sampling"].update(top_p=0), "sampling.top_p: must be greater than 0"),
    (lambda d: d["sampling"].update(top_k="40"), "sampling.top_k: must be an integer, got a string"),
    (lambda d: d["sampling"].update(seed=1.5), "sampling.seed"),
    (lambda d: d.update(title=None), "title: must be a string"),
    (lambda d: d["messages"][1].update(stats={"tokens": True}), "messages[1].stats.tokens: must be an integer"),
    (lambda d: d["messages"][1]["stats"].update(ttft_s=-1), "messages[1].stats.ttft_s: must be greater than"),
    (lambda d: d["messages"][1]["stats"].update(finish_reason=3), "messages[1].stats.finish_reason: must be a string"),
    (lambda d: d["messages"][1]["tokens"][0].update(prob=1.5), "messages[1].tokens[0].prob: must be less than"),
    (lambda d: d["messages"][1]["tokens"][0].update(id="5"), "messages[1].tokens[0].id: must be an integer"),
    (lambda d: d["messages"][1]["tokens"][0].pop("text"), "messages[1].tokens[0]: 'text' is missing"),
    (lambda d: d["messages"][1]["tokens"][1]["top"][0].__setitem__(1, 6), "tokens[1].top[0][1]: must be a string"),
    (lambda d: d["messages"][1]["tokens"][1]["top"][0].__delitem__(3), "messages[1].tokens[1].top[0][3] is missing"),
    (lambda d: d["messages"][1]["tokens"][0].update(top=[[5, "Café", "3.0", 0.5]]), "top[0][2]: must be a number"),
    (lambda d: d["messages"][1].update(reasoning=["a"]), "messages[1].reasoning: must be a string"),
    (lambda d: d["messages"][3].update(tool_calls=["w"]), "messages[3].tool_calls[0]: must be an object"),
    (lambda d: d.update(current=7), "current: must be a string"),
    (lambda d: d.update(mode="poetry"), "mode: must be 'chat' or 'completion', got 'poetry'"),
    (lambda d: d.update(system_changes=[{"after": None}]), "system_changes[0]: 'text' is missing"),
]


@pytest.mark.parametrize(("change", "reason"), FIELD_PROBLEMS)
def test_a_bad_field_makes_the_file_unreadable_with_its_reason(tmp_path: Path, change, reason: str) -> None:
    store = ConversationStore(tmp_path)
    conv = rich_conversation()
    path = store.save(conv)
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")
    listing = store.list()
    assert listing.conversations == []
    [unreadable] = listing.unreadable
    assert reason in unreadable.reason and "\n" not in unreadable.reason, unreadable.reason
    with pytest.raises(StoreError, match=re.escape(reason)):
        store.load(conv.id)
    with pytest.raises(StoreError, match="will not overwrite"):
        ConversationStore(tmp_path).save(conv)


def test_a_version_1_file_from_an_older_llmchat_opens(tmp_path: Path) -> None:
    """What the first llmchat wrote: 4-item top-k entries, stats without a timeline, no mode, and
    keys this one does not know (ignored, as version 1 readers always did)."""
    data = {
        "format": FORMAT, "version": 1, "id": "20240101-000000-abcdef", "title": "old",
        "created": "2024-01-01T00:00:00Z", "updated": "2024-01-01T00:00:01Z",
        "model": {"name": "smollm", "path": "/m", "format": "gguf"},
        "sampling": {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.0},
        "system": "Be terse.", "current": "m2", "added_by_someone": {"x": 1},
        "messages": [
            {"id": "m1", "parent": None, "role": "user", "content": "hi"},
            {"id": "m2", "parent": "m1", "role": "assistant", "content": "Hello",
             "stats": {"tokens": 1, "ttft_s": 0.1, "prefill_tok_s": 90.0, "decode_tok_s": 0.0, "finish_reason": "eos",
                       "prompt_tokens": 9, "reused_tokens": 0},
             "tokens": [{"id": 5, "text": "Hello", "prob": 1, "rank": 0, "top": [[5, "Hello", 20, 1.0]]}]},
        ],
    }  # fmt: skip
    (tmp_path / "20240101-000000-abcdef.json").write_text(json.dumps(data), encoding="utf-8")
    store = ConversationStore(tmp_path)
    conv = store.load("20240101-000000-abcdef")
    assert conv.mode == "chat" and conv.system == "Be terse." and conv.model["format"] == "gguf"
    old_record = {"id": 5, "text": "Hello", "prob": 1.0, "rank": 0, "top": [[5, "Hello", 20, 1.0]]}
    assert conv.path()[-1].tokens == [old_record]
    store.save(conv)
    assert store.load(conv.id) == conv


def test_what_this_llmchat_writes_it_reads_back(tmp_path: Path) -> None:
    """Every new field at once: system prompt changes, an interrupted answer, compact token records."""
    from llmchat.chat.conversation import interrupted_stats

    conv = rich_conversation()
    conv.set_system("Now in French.")
    conv.add_user("encore")
    records = [{"id": 1, "text": "Oui", "prob": 0.8323074, "policy_prob": 1.0, "rank": 0, "entropy": -0.0001,
                "policy_entropy": 0.0, "seconds": 0.01, "top": [[1, "Oui", 25.325, 0.8323074, 1.0],
                                                               [2, "Non", float("-inf"), 0.0, 0.0]]}]  # fmt: skip
    conv.add_assistant("Oui", tokens=records, stats=interrupted_stats(records))  # type: ignore[arg-type]
    store = ConversationStore(tmp_path)
    store.save(conv)
    loaded = store.load(conv.id)
    assert loaded == conv
    assert loaded.system_changes == conv.system_changes and loaded.system_changes[-1]["text"] == "Now in French."
    assert loaded.path()[-1].stats == {"tokens": 1, "finish_reason": "interrupted"}


def test_a_file_changed_behind_the_stores_back_is_checked_again_before_a_save(tmp_path: Path) -> None:
    """A save does not re-read a file the store itself wrote or read (it is ~1 MB with the token
    records), but one that changed since is read again, and a broken one is not replaced."""
    store = ConversationStore(tmp_path)
    conv = rich_conversation()
    path = store.save(conv)
    store.save(conv)  # its own file: no re-read needed
    path.write_text('{"format": "llmchat.conversation", "version": 1, "id": ', encoding="utf-8")  # another program
    with pytest.raises(StoreError, match="will not overwrite"):
        store.save(conv)
    assert path.read_text(encoding="utf-8").endswith('"id": ')


def test_an_unknown_policy_probability_stays_unknown_through_a_saved_file(tmp_path: Path) -> None:
    """A server's token (policy probability not reported: NaN) is saved without one and read back as
    unknown, not as 0 (which the panels show as "cut by the policy")."""
    import math

    from llmchat.chat.conversation import token_record
    from llmchat.engine.events import TokenEvent, TopToken
    from llmchat.tui.widgets.tokens import token_event

    top = (TopToken(0, "Paris", -0.1, 0.9, math.nan), TopToken(1, "Lyon", -3.0, 0.05, math.nan))
    event = TokenEvent(0, "Paris", 0, -0.1, 0.9, math.nan, 0, top, 0.01, 0, 0)
    conversation = Conversation(model={"name": "m", "server": "http://127.0.0.1:1"})
    conversation.add_user("capital?")
    conversation.add_assistant("Paris", stats={"tokens": 1}, tokens=[token_record(event)])
    store = ConversationStore(tmp_path / "c")
    store.save(conversation)
    [record] = next(m for m in store.load(conversation.id).messages if m.role == "assistant").tokens or []
    assert "policy_prob" not in record and all(len(entry) == 4 for entry in record["top"])
    back = token_event(record, 0)
    assert math.isnan(back.policy_prob) and all(math.isnan(t.policy_prob) for t in back.top)
    assert back.prob == pytest.approx(0.9) and [t.text for t in back.top] == ["Paris", "Lyon"]
