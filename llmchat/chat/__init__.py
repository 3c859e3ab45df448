"""Conversations: the message tree (`conversation`), its files (`store`), readable transcripts (`transcript`).

Standard library only, so the chat screen and `llmchat chats ...` start without loading torch.
"""

from llmchat.chat.conversation import (
    Conversation,
    ConversationError,
    ConversationFormatError,
    Message,
    answer_stats,
    token_record,
)
from llmchat.chat.store import ConversationStore, Listing, StoreError, Summary, Unreadable

__all__ = [
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
    "token_record",
]
