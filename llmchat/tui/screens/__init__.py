"""Modal screens of the TUI: conversations, models, system prompt, help, start-up problems, and small
shared dialogs."""

from llmchat.tui.screens.confirm import ConfirmScreen, Dialog, TextPromptScreen
from llmchat.tui.screens.conversations import ConversationsScreen
from llmchat.tui.screens.help import PANELS_HELP, HelpScreen, binding_rows
from llmchat.tui.screens.models import ModelsScreen
from llmchat.tui.screens.problems import Problem, ProblemsScreen
from llmchat.tui.screens.system_prompt import SystemPromptScreen

__all__ = [
    "PANELS_HELP",
    "ConfirmScreen",
    "ConversationsScreen",
    "Dialog",
    "HelpScreen",
    "ModelsScreen",
    "Problem",
    "ProblemsScreen",
    "SystemPromptScreen",
    "TextPromptScreen",
    "binding_rows",
]
