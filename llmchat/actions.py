"""The chat's actions, declared once: id, default key, footer label, what it runs, its title and help.

settings.toml rebinds keys by action id (settings.py checks them against this table); the app builds
its key bindings, footer, help screen and command palette from it. No Textual here: settings and
the CLI read the table without loading the UI.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    """One action of the chat screen."""

    id: str  # what settings.toml's [keys] names
    key: str  # the default key (Textual's names; comma-separated alternatives)
    label: str  # the footer's word for it
    runs: str  # the Textual action it runs, e.g. "temperature(1)"
    title: str  # the help screen's and the command palette's line
    help: str = ""  # the palette's second line (the label when empty)
    in_footer: bool = False  # the footer has room for the everyday keys; all are on F1 and in Ctrl+P
    over_inspector: bool = False  # keeps working while the inspector screen is open


ACTIONS: tuple[Action, ...] = (
    Action(
        "stop", "escape", "Stop", "stop", "Stop the answer (or cancel an edit)", in_footer=True, over_inspector=True
    ),
    Action("new_chat", "ctrl+n", "New chat", "new_chat", "New chat"),
    Action(
        "temperature_down", "f2", "Temp−", "temperature(-1)", "Temperature down", in_footer=True, over_inspector=True
    ),
    Action(
        "temperature_up",
        "f3",
        "Temp+",
        "temperature(1)",
        "Temperature up",
        help="Hotter sampling from the next token on",
        in_footer=True,
        over_inspector=True,
    ),
    Action("top_p_down", "f4", "Top-p−", "top_p(-1)", "Top-p down", in_footer=True, over_inspector=True),
    Action("top_p_up", "f5", "Top-p+", "top_p(1)", "Top-p up", in_footer=True, over_inspector=True),
    Action("top_k_down", "f6", "Top-k−", "top_k(-1)", "Top-k down", in_footer=True, over_inspector=True),
    Action("top_k_up", "f7", "Top-k+", "top_k(1)", "Top-k up", in_footer=True, over_inspector=True),
    Action(
        "regenerate",
        "ctrl+r",
        "Regenerate",
        "regenerate",
        "Regenerate the last answer",
        help="A new answer beside the old one (a branch)",
        in_footer=True,
    ),
    Action(
        "edit_last",
        "ctrl+e",
        "Edit",
        "edit_last",
        "Edit the last message",
        help="Resend the last prompt, edited, as a branch",
    ),
    Action("branch_previous", "alt+left", "◀ Branch", "branch(-1)", "Previous branch"),
    Action("branch_next", "alt+right", "Branch ▶", "branch(1)", "Next branch"),
    Action(
        "token_previous",
        "f8",
        "◀ Token",
        "token(-1)",
        "Previous token",
        help="Inspect an earlier token's alternatives in the top-k panel",
        over_inspector=True,
    ),
    Action("token_next", "f9", "Token ▶", "token(1)", "Next token", over_inspector=True),
    Action(
        "token_view",
        "alt+t",
        "Tokens",
        "token_view",
        "Token view: text / heatmap / heatmap with ids",
        help="Each token coloured by the probability the model gave it",
        over_inspector=True,
    ),
    Action(
        "branch_here",
        "ctrl+b",
        "Branch here",
        "branch_here",
        "Branch at the token under the cursor",
        help="Cut the answer at the cursor, pick another token there, and continue",
        over_inspector=True,
    ),
    Action(
        "policy_view",
        "alt+p",
        "Policy",
        "inspect('policy')",
        "Inspector: the decoding policy of a step",
        help="Each sampler stage's distribution; F2–F7 show a what-if at once",
        over_inspector=True,
    ),
    Action(
        "prompt_view",
        "alt+v",
        "Prompt",
        "inspect('prompt')",
        "Inspector: the prompt as the model sees it",
        over_inspector=True,
    ),
    Action(
        "timeline_view",
        "alt+l",
        "Timeline",
        "inspect('timeline')",
        "Inspector: prefill and decode timeline",
        over_inspector=True,
    ),
    Action(
        "layers_view",
        "alt+y",
        "Layers",
        "inspect('layers')",
        "Inspector: inside the layers at a step",
        help="Logit lens, attention over the tokens, experts and recurrent state of the selected step",
        over_inspector=True,
    ),
    Action(
        "surprise_view",
        "alt+u",
        "Surprise",
        "inspect('surprise')",
        "Inspector: how surprising each prompt token was",
        help="The prompt as a heatmap of the model's own probabilities (one prefill)",
        over_inspector=True,
    ),
    Action(
        "quantization_view",
        "alt+q",
        "Quantization",
        "inspect('quantization')",
        "Inspector: what packing the weights changed",
        help="The answer under packed weights and under the float32 reference of the same file",
        over_inspector=True,
    ),
    Action("toggle_panels", "ctrl+t", "Panels", "toggle_panels", "Toggle the side panels"),
    Action(
        "conversations",
        "ctrl+o",
        "Chats",
        "conversations",
        "Conversations",
        help="Open, search, rename or delete saved conversations",
        in_footer=True,
    ),
    Action("models", "ctrl+l", "Models", "models", "Models", help="Load another model"),
    Action("system_prompt", "ctrl+s", "System", "system_prompt", "System prompt"),
    Action(
        "completion_mode",
        "alt+m",
        "Completion",
        "completion_mode",
        "Completion mode on / off (no chat template: the model continues the transcript)",
        help="The transcript as one plain text the model continues (a base model has only this mode)",
    ),
    Action("theme", "f10", "Theme", "next_theme", "Next theme", help="Cycle the themes; the choice is saved"),
    Action("help", "f1", "Help", "help", "Keys", in_footer=True, over_inspector=True),
    Action("quit", "ctrl+q", "Quit", "quit", "Quit", in_footer=True),
)
ACTION = {action.id: action for action in ACTIONS}
