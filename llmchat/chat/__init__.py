"""Conversations: the message tree (`conversation`), what a file may hold (`schema`), the files
(`store`), a streaming answer's journal (`journal`), readable transcripts (`transcript`).

No torch, so the chat screen and `llmchat chats ...` start without loading it.
"""

from llmchat.chat.conversation import (
    INTERRUPTED,
    Conversation,
    ConversationError,
    ConversationFormatError,
    Message,
    answer_stats,
    interrupted_stats,
    token_record,
)
from llmchat.chat.journal import AnswerJournal
from llmchat.chat.store import ConversationStore, Listing, StoreError, Summary, Unreadable

__all__ = [
    "INTERRUPTED",
    "AnswerJournal",
    "Conversation",
    "ConversationError",
    "ConversationFormatError",
    "ConversationStore",
    "Listing",
    "Message",
    "StoreError",
    "Summary",
    "Unreadable",
    "answer_stats",
    "interrupted_stats",
    "token_record",
]
