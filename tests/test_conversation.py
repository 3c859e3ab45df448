"""The conversation tree: branches from regenerate and edit, switching, the path and what the template sees."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys

import pytest

from llmchat.chat.conversation import (
    CONVERSATION_ID,
    INTERRUPTED,
    TITLE_LIMIT,
    Conversation,
    ConversationError,
    ConversationFormatError,
    Message,
    answer_stats,
    interrupted_stats,
    make_title,
    new_conversation_id,
    token_record,
)
from llmchat.engine.events import Finished, TokenEvent, TopToken


def two_turns(system: str = "") -> Conversation:
    conv = Conversation(system=system, model={"name": "tiny"})
    conv.add_user("Hello there")
    conv.add_assistant("Hi!")
    conv.add_user("What is 2+2?")
    conv.add_assistant("4")
    return conv


def contents(conv: Conversation) -> list[str]:
    return [m.content for m in conv.path()]


def test_path_follows_parents_and_counts_turns() -> None:
    conv = two_turns()
    assert contents(conv) == ["Hello there", "Hi!", "What is 2+2?", "4"]
    assert [m.role for m in conv.path()] == ["user", "assistant", "user", "assistant"]
    path = conv.path()
    assert path[0].parent is None and all(b.parent == a.id for a, b in zip(path, path[1:]))
    assert conv.current == path[-1].id
    assert conv.turns == 2
    assert conv.title == "Hello there"


def test_regenerate_adds_a_sibling_answer_and_keeps_the_old_one() -> None:
    conv = two_turns()
    old = conv.path()[-1]
    new = conv.regenerate()
    assert new.role == "assistant" and new.content == "" and new.parent == old.parent
    assert conv.current == new.id
    assert [m.id for m in conv.branch_siblings(old.id)] == [old.id, new.id]
    assert conv.sibling_position(new.id) == (1, 2)
    conv.append(new.id, "Four", reasoning="2+2 is 4")
    conv.append(new.id, ".")
    assert contents(conv) == ["Hello there", "Hi!", "What is 2+2?", "Four."]
    assert conv.get(new.id).reasoning == "2+2 is 4"
    assert conv.get(old.id).content == "4"  # the first answer is still there
    # The prompt for the new answer stops before it.
    assert conv.chat_messages(before=new.id)[-1] == {"role": "user", "content": "What is 2+2?"}


def test_regenerate_after_a_user_message_answers_it() -> None:
    conv = Conversation()
    user = conv.add_user("ping")
    answer = conv.regenerate()
    assert answer.parent == user.id and answer.role == "assistant"
    with pytest.raises(ConversationError, match="no message"):
        Conversation().regenerate()


def test_edit_user_makes_a_new_branch() -> None:
    conv = two_turns()
    question = conv.path()[2]
    edited = conv.edit_user(question.id, "What is 3+3?")
    assert edited.parent == question.parent and edited.role == "user"
    assert contents(conv) == ["Hello there", "Hi!", "What is 3+3?"]
    conv.add_assistant("6")
    assert contents(conv) == ["Hello there", "Hi!", "What is 3+3?", "6"]
    assert [m.content for m in conv.branch_siblings(edited.id)] == ["What is 2+2?", "What is 3+3?"]
    # Back to the old question: the branch under it comes back whole.
    conv.select(question.id)
    assert contents(conv) == ["Hello there", "Hi!", "What is 2+2?", "4"]
    with pytest.raises(ConversationError, match="not a user message"):
        conv.edit_user(conv.path()[1].id, "changed answer")


def test_select_goes_to_the_most_recent_leaf_below() -> None:
    conv = two_turns()
    first_user, first_answer, question, answer = conv.path()
    retry = conv.regenerate()
    conv.append(retry.id, "four")
    # Continue on the old answer's branch: its leaf is now the newest of the whole tree.
    conv.select(answer.id)
    assert conv.current == answer.id
    conv.add_user("Thanks")
    thanks_answer = conv.add_assistant("You're welcome")
    conv.select(retry.id)
    assert contents(conv)[-1] == "four"
    assert conv.select(first_user.id).id == thanks_answer.id
    assert contents(conv) == ["Hello there", "Hi!", "What is 2+2?", "4", "Thanks", "You're welcome"]
    assert conv.turns == 3
    with pytest.raises(ConversationError, match="no message"):
        conv.select("nope")


def test_switch_branch_steps_through_siblings_and_wraps() -> None:
    conv = two_turns()
    a = conv.path()[-1]
    b = conv.regenerate()
    conv.append(b.id, "four")
    c = conv.regenerate()
    conv.append(c.id, "IV")
    assert [m.id for m in conv.branch_siblings(a.id)] == [a.id, b.id, c.id]
    assert conv.switch_branch(c.id, +1).id == a.id
    assert conv.switch_branch(a.id, -1).id == c.id
    assert conv.switch_branch(a.id, +1).id == b.id
    assert conv.current == b.id


def test_chat_messages_with_and_without_system_prompt() -> None:
    plain = two_turns()
    assert plain.chat_messages() == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    with_system = two_turns(system="Answer briefly.")
    messages = with_system.chat_messages()
    assert messages[0] == {"role": "system", "content": "Answer briefly."}
    assert messages[1:] == plain.chat_messages()


def test_chat_messages_leave_reasoning_out_and_keep_tool_calls() -> None:
    conv = Conversation()
    conv.add_user("weather?")
    call = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    conv.add_assistant("", reasoning="I should call the tool", tool_calls=call)
    conv.add_tool('{"temp": 3}')
    conv.add_assistant("It is 3 degrees.", reasoning="the tool said 3")
    messages = conv.chat_messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert messages[3] == {"role": "assistant", "content": "It is 3 degrees."}
    assert all("reasoning" not in m and "think" not in m["content"] for m in messages)


def test_title_comes_from_the_first_user_message_only() -> None:
    conv = Conversation()
    long_text = "Please   explain\nin detail " + "how rotary position embeddings work " * 5
    conv.add_user(long_text)
    assert conv.title == make_title(long_text)
    assert len(conv.title) <= TITLE_LIMIT and conv.title.endswith("…")
    assert conv.title.startswith("Please explain in detail how rotary")
    conv.add_assistant("...")
    conv.add_user("another question")
    assert conv.title.startswith("Please explain")
    assert make_title("  short\n question ") == "short question"


def test_message_ids_stay_unique() -> None:
    conv = two_turns()
    for _ in range(3):
        conv.regenerate()
    conv.edit_user(conv.path()[0].id, "Hello again")
    # A loaded conversation whose ids have gaps must not hand out an id twice.
    loaded = Conversation.from_dict(
        Conversation(
            messages=[Message("m2", None, "user", "a"), Message("m3", "m2", "assistant", "b")], current="m3"
        ).to_dict()
    )
    loaded.add_user("c")
    loaded.add_assistant("d")
    for c in (conv, loaded):
        ids = [m.id for m in c.messages]
        assert len(ids) == len(set(ids))


def test_updated_moves_forward_on_changes() -> None:
    conv = Conversation(created="2020-01-01T00:00:00.000+00:00")
    assert conv.updated == conv.created
    conv.add_user("hi")
    assert conv.updated > conv.created


def test_conversation_ids_are_filename_safe_and_distinct() -> None:
    ids = {new_conversation_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(CONVERSATION_ID.fullmatch(i) for i in ids)
    with pytest.raises(ConversationFormatError, match="not valid"):
        Conversation(id="../escape")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d["messages"].append({"id": "m1", "parent": None, "role": "user", "content": "x"}), "twice"),
        (lambda d: d["messages"][0].update(parent="m9"), "not an earlier message"),
        (lambda d: d["messages"][0].update(role="wizard"), r"messages\[0\].role: must be 'system', .* got 'wizard'"),
        (lambda d: d["messages"][0].update(content=5), r"messages\[0\].content: must be a string, got an integer"),
        (lambda d: d["messages"][1].update(tokens=[1, 2]), r"messages\[1\].tokens\[0\]: must be an object"),
        (lambda d: d.update(current="m99"), "current message"),
        (lambda d: d.update(messages={}), "messages: must be a list, got an object"),
        (lambda d: d.update(updated="yesterday"), "ISO 8601"),
        (lambda d: d.pop("system"), "'system' is missing"),
    ],
)
def test_schema_errors_name_the_problem(change, needle: str) -> None:
    data = two_turns().to_dict()
    change(data)
    with pytest.raises(ConversationFormatError, match=needle):
        Conversation.from_dict(data)


def test_records_from_engine_events() -> None:
    top = (TopToken(7, "Paris", 12.5, 0.8, 0.9), TopToken(3, "Lyon", 10.0, 0.1, 0.1))
    event = TokenEvent(
        token_id=7, text="Paris", index=0, logit=12.5, prob=0.8, policy_prob=0.9, rank=0, top=top,
        seconds=0.1, cache_tokens=10, cache_bytes=100, entropy=1.23456, policy_entropy=0.5,
    )  # fmt: skip
    record = token_record(event)
    assert record == {
        "id": event.token_id,
        "text": event.text,
        "prob": 0.8,
        "policy_prob": 0.9,
        "rank": 0,
        "entropy": 1.2346,
        "policy_entropy": 0.5,
        "seconds": 0.1,
        "top": [[7, "Paris", 12.5, 0.8, 0.9], [3, "Lyon", 10.0, 0.1, 0.1]],
    }
    assert token_record(event, forced=True)["forced"] is True  # picked at a branch
    done = Finished(
        reason="eos", prompt_tokens=20, reused_tokens=5, prefilled_tokens=15, generated_tokens=11,
        prefill_seconds=0.5, decode_seconds=2.0, ttft_seconds=0.6, prefill_chunks=((12, 0.4), (3, 0.1)),
    )  # fmt: skip
    stats = answer_stats(done)
    assert stats["prefill_chunks"] == [[12, 0.4], [3, 0.1]]
    assert stats["tokens"] == 11 and stats["finish_reason"] == "eos"
    assert stats["prefill_tok_s"] == pytest.approx(done.prefill_tokens_per_second, abs=0.01)
    assert stats["decode_tok_s"] == pytest.approx(done.decode_tokens_per_second, abs=0.01)


def test_chat_layer_loads_without_torch() -> None:
    code = "import sys, llmchat.chat, llmchat.chat.transcript, llmchat.cli.chats; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- interrupted and empty answers ------------------------------------------------------------------


def test_an_empty_answer_is_never_sent_and_the_user_turns_around_it_join() -> None:
    conv = Conversation(system="Be brief.")
    conv.add_user("first question")
    conv.add_assistant("", stats=interrupted_stats([]))  # killed before its first token
    conv.add_user("second question")
    conv.add_assistant("", reasoning="thinking only", stats=interrupted_stats([]))  # nothing to say yet
    messages = conv.chat_messages()
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question\n\nsecond question"},
    ]
    roles = [m["role"] for m in messages]
    assert all(a != b for a, b in zip(roles, roles[1:]))  # alternating, as strict templates require
    # A tool call with no text is a real turn; a partial answer is sent as it is.
    conv.add_user("weather?")
    call = [{"type": "function", "function": {"name": "weather", "arguments": {}}}]
    conv.add_assistant("", tool_calls=call)
    conv.add_tool("sunny")
    conv.add_assistant("It is sun", stats=interrupted_stats([]))
    assert [m["role"] for m in conv.chat_messages()][-4:] == ["user", "assistant", "tool", "assistant"]
    assert conv.chat_messages()[-1]["content"] == "It is sun"
    # In completion mode the transcript is the text as typed: nothing is put between the two.
    conv.mode = "completion"
    assert conv.chat_messages()[1]["content"] == "first questionsecond questionweather?"


def test_regenerate_reuses_an_empty_unfinished_answer_and_keeps_real_ones() -> None:
    conv = Conversation()
    conv.add_user("hi")
    empty = conv.add_assistant("", stats=interrupted_stats([]))
    again = conv.regenerate()
    assert again is empty and again.stats is None and len(conv.messages) == 2
    failed = conv.regenerate()  # empty and never finished (no stats: it failed): reused too
    assert failed is empty
    conv.update(empty.id, stats={"tokens": 0, "finish_reason": "cancelled"})  # Esc during the prefill
    assert conv.regenerate() is empty
    # An answer with text, even cut short, stays as a branch; so does an empty one the model ended.
    conv.append(empty.id, "partial")
    conv.update(empty.id, stats=interrupted_stats([]))
    branch = conv.regenerate()
    assert branch is not empty and conv.sibling_position(branch.id) == (1, 2)
    conv.update(branch.id, stats={"tokens": 0, "finish_reason": "eos"})
    third = conv.regenerate()
    assert third is not branch and conv.sibling_position(third.id) == (2, 3)


def test_interrupted_stats_count_the_answer_tokens_not_the_end_step() -> None:
    records = [{"id": 1, "text": "a", "prob": 1.0, "rank": 0, "top": []}, {"id": 2, "text": "", "prob": 1.0,
               "rank": 0, "top": [], "end": True}]  # fmt: skip
    assert interrupted_stats(records) == {"tokens": 1, "finish_reason": INTERRUPTED}  # type: ignore[arg-type]
    assert interrupted_stats(None) == {"tokens": 0, "finish_reason": INTERRUPTED}


# --- where the system prompt was set ----------------------------------------------------------------


def test_system_prompts_are_placed_where_they_were_set() -> None:
    conv = Conversation()
    for turn in range(4):
        conv.add_user(f"q{turn}")
        conv.add_assistant(f"a{turn}")
    conv.set_system("Answer in French.")
    conv.add_user("q4")
    conv.add_assistant("a4")
    assert conv.system_prompts() == [(8, "Answer in French.")]  # before the 5th user message
    assert conv.chat_messages()[0] == {"role": "system", "content": "Answer in French."}  # the model: first
    conv.set_system("Answer in German.")
    conv.set_system("Answer in Dutch.")  # changed twice before a message: only the last one applied
    assert conv.system_prompts() == [(8, "Answer in French."), (10, "Answer in Dutch.")]  # after the branch
    conv.add_user("q5")
    conv.set_system("")
    assert conv.system_prompts() == [(8, "Answer in French."), (10, "Answer in Dutch."), (11, "")]
    # Another branch from before the first change: the prompts apply from its next message on.
    conv.select(conv.path()[2].id)
    old_branch = conv.path()
    edited = conv.edit_user(old_branch[2].id, "q1, edited")
    assert conv.path()[-1] is edited
    assert conv.system_prompts() == []  # the prompt in force when it was sent was none (removed since)
    conv.set_system("Be brief.")
    conv.add_assistant("ok")
    assert conv.system_prompts() == [(3, "Be brief.")]  # before the answer that came after it
    # The changes survive the file, and their messages must exist.
    data = conv.to_dict()
    assert Conversation.from_dict(data) == conv
    data["system_changes"][0]["after"] = "m99"
    with pytest.raises(ConversationFormatError, match="system prompt change follows 'm99'"):
        Conversation.from_dict(data)


def test_a_prompt_from_before_changes_were_kept_counts_from_the_start() -> None:
    conv = two_turns(system="Old prompt.")
    assert conv.system_prompts() == [(0, "Old prompt.")]
    conv.set_system("New prompt.")
    conv.add_user("next")
    assert conv.system_prompts() == [(0, "Old prompt."), (4, "New prompt.")]
    # A file edited by hand so that its prompt is not the last change: only the prompt, at the start.
    conv.system = "Edited."
    assert conv.system_prompts() == [(0, "Edited.")]


def test_token_records_keep_float32_numbers_in_fewer_digits() -> None:
    f32 = struct.Struct("<f")

    def as_f32(x: float) -> float:
        return f32.unpack(f32.pack(x))[0]

    rng = random.Random(5)
    plain = compact = 0
    for _ in range(300):
        logit, prob = as_f32(rng.uniform(-30, 30)), as_f32(rng.random() ** 3)
        top = (TopToken(7, "Paris", logit, prob, as_f32(prob / 2)),)
        event = TokenEvent(
            token_id=7, text="Paris", index=0, logit=logit, prob=prob, policy_prob=as_f32(prob / 2), rank=0,
            top=top, seconds=0.1, cache_tokens=0, cache_bytes=0, entropy=0.5, policy_entropy=0.5,
        )  # fmt: skip
        record = token_record(event)
        saved = json.loads(json.dumps(record))
        assert as_f32(saved["top"][0][2]) == logit and as_f32(saved["prob"]) == prob  # nothing lost
        plain += len(json.dumps([logit, prob]))
        compact += len(json.dumps([saved["top"][0][2], saved["prob"]]))
    assert compact < 0.7 * plain
    long = json.dumps([0.8323073983192444, 25.325000762939453])
    short = json.dumps([token_record(_event_with(0.8323073983192444, 25.325000762939453))["prob"],
                        token_record(_event_with(0.8323073983192444, 25.325000762939453))["top"][0][2]])  # fmt: skip
    assert short == "[0.8323074, 25.325001]" and len(short) < len(long)
    # Rounding never takes a probability out of [0, 1] (the schema would refuse the file).
    assert token_record(_event_with(float("nan"), 1.0))["prob"] == 0.0


def _event_with(prob: float, logit: float) -> TokenEvent:
    return TokenEvent(
        token_id=1, text="x", index=0, logit=logit, prob=prob, policy_prob=1.0, rank=0,
        top=(TopToken(1, "x", logit, prob, 1.0),), seconds=0.0, cache_tokens=0, cache_bytes=0,
    )  # fmt: skip
