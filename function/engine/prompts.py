"""Prompts as the model sees them: the tokenizer's chat template, else the instruction format."""

from __future__ import annotations

from typing import TYPE_CHECKING

from function.config import Settings

if TYPE_CHECKING:
    from function.weights.loading import LoadedModel


def build_chat_prompt(loaded: LoadedModel, instruction: str, input_text: str, settings: Settings) -> str:
    """The tokenizer's chat template when the model has one, else the instruction format."""
    if loaded.chat_template:
        content = instruction if not input_text else f"{instruction}\n\n{input_text}"
        prompt: str = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return prompt
    if input_text:
        return settings.instruction_input_template.format(instruction=instruction, input=input_text)
    return settings.instruction_template.format(instruction=instruction)


def build_messages_prompt(loaded: LoadedModel, messages: list[dict[str, str]], settings: Settings) -> str:
    """OpenAI-style messages: the chat template, else the instruction format with the last user message
    (or the last message, when none is the user's) as the instruction and the turns before it as the input."""
    if loaded.chat_template:
        prompt: str = loaded.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return prompt
    users = [index for index, message in enumerate(messages) if message["role"] == "user"]
    last_user = users[-1] if users else len(messages) - 1  # no user turn: the last message is the instruction
    context = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:last_user])
    return build_chat_prompt(loaded, messages[last_user]["content"], context, settings)
