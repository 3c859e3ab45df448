"""What kind of model a package holds: base or chat, reasoning, tool use.

Read from what the package ships, not from its name: a chat template makes a chat (instruct)
model; `<think>` markers in the template or the vocabulary (or a template reading
`enable_thinking`/`reasoning_content`) make a reasoning model; a template that renders `tools`
makes a tool-tuned one. Harmony's channel tokens (gpt-oss) make a reasoning model whose analysis
channel is its reasoning (reasoning.HarmonySplitter).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmchat.engine.chat_template import ChatTemplates, template_variables
from llmchat.engine.reasoning import HARMONY_MARKERS, THINK_MARKERS
from llmchat.engine.tokenizer import Tokenizer

# Variables transformers always passes; the rest of what a template reads are its own knobs.
_STANDARD_VARIABLES = frozenset(
    {
        "messages",
        "tools",
        "documents",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "sep_token",
        "cls_token",
        "mask_token",
        "raise_exception",
        "strftime_now",
        "namespace",
        "dict",
        "range",
        "loop",
    }
)
_REASONING_VARIABLES = frozenset({"enable_thinking", "thinking", "reasoning_content", "reasoning_effort"})


@dataclass(frozen=True)
class ModelTraits:
    chat: bool
    reasoning: bool
    tools: bool
    reasoning_markers: tuple[str, str] | None
    template_variables: tuple[str, ...]  # extra variables the default template reads

    @property
    def kind(self) -> str:
        """One word for lists: base, chat, reasoning (reasoning implies chat)."""
        if self.reasoning:
            return "reasoning"
        return "chat" if self.chat else "base"

    @property
    def labels(self) -> list[str]:
        return [name for name, on in (("chat", self.chat), ("reasoning", self.reasoning), ("tools", self.tools)) if on]


def detect(templates: ChatTemplates | None, tokenizer: Tokenizer) -> ModelTraits:
    sources = list(templates.templates.values()) if templates else []
    variables: set[str] = set()
    for source in sources:
        variables |= template_variables(source)
    open_marker, close_marker = THINK_MARKERS
    in_vocab = tokenizer.token_id(open_marker) is not None and tokenizer.token_id(close_marker) is not None
    in_template = any(close_marker in source for source in sources)
    reasoning = in_vocab or in_template or bool(variables & _REASONING_VARIABLES)
    # harmony (gpt-oss): channels in the vocabulary, and in the template where there is one
    harmony = all(tokenizer.token_id(t) is not None for t in ("<|channel|>", "<|message|>", "<|end|>")) and (
        not sources or any("<|channel|>" in source for source in sources)
    )
    default = templates.templates.get("default", "") if templates else ""
    extra = sorted(template_variables(default) - _STANDARD_VARIABLES) if default else []
    return ModelTraits(
        chat=bool(sources),
        reasoning=reasoning or harmony,
        tools="tools" in variables,
        reasoning_markers=HARMONY_MARKERS if harmony else THINK_MARKERS if reasoning else None,
        template_variables=tuple(extra),
    )
