"""The Qwen2-VL chat template (LLaMA-Factory ``qwen2_vl``), rendered in Python as labelled segments.

A conversation renders to::

    <|im_start|>system\n{system}<|im_end|>\n            (default system prompt when none is given)
    <|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n
    {reply}<|im_end|>\n                                   (trained on: reply, <|im_end|> and the newline)

with ``<image>``/``<video>`` placeholders replaced by ``<|vision_start|><|image_pad|><|vision_end|>`` (one pad; the
processor expands it to the grid's token count after tokenising). Segments are tokenised one by one, as LLaMA-Factory
does, so label boundaries fall exactly on segment boundaries.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from infinitevl_jax.processing.tokenizer import IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
IMAGE_SPAN = VISION_START + IMAGE_PAD + VISION_END
VIDEO_SPAN = VISION_START + VIDEO_PAD + VISION_END

# sharegpt spellings of roles.
_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class ConversationError(ValueError):
    """A malformed conversation: unknown role, misplaced system message, empty or non-text content."""


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """``[{"role", "content": str}]`` from sharegpt (``from``/``value``) or OpenAI/HF (``role``/``content``) messages.

    HF-style content lists (``[{"type": "image"}, {"type": "text", "text": ...}]``) become placeholder strings.
    """
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ConversationError(f"message {i} is not an object")
        role = m.get("role", m.get("from"))
        if role not in _ROLE_ALIASES:
            raise ConversationError(f"message {i} has unknown role {role!r}")
        content = m.get("content", m.get("value"))
        if isinstance(content, list):
            content = "".join(_part_text(p, i) for p in content)
        if not isinstance(content, str):
            raise ConversationError(f"message {i} content is not text")
        out.append({"role": _ROLE_ALIASES[role], "content": content})
    for i, m in enumerate(out):
        if m["role"] == "system" and i != 0:
            raise ConversationError(f"system message at position {i}; only the first message may be a system prompt")
    return out


def _part_text(part: Any, i: int) -> str:
    if isinstance(part, str):
        return part
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text":
        return part.get("text", "")
    if kind == "image":
        return IMAGE_PLACEHOLDER
    if kind == "video":
        return VIDEO_PLACEHOLDER
    raise ConversationError(f"message {i} has a content part of unknown type {kind!r}")


def count_placeholders(messages: Iterable[Mapping[str, str]]) -> tuple[int, int]:
    """(number of ``<image>``, number of ``<video>``) over all messages."""
    n_img = n_vid = 0
    for m in messages:
        n_img += m["content"].count(IMAGE_PLACEHOLDER)
        n_vid += m["content"].count(VIDEO_PLACEHOLDER)
    return n_img, n_vid


def _expand_placeholders(text: str) -> str:
    return text.replace(IMAGE_PLACEHOLDER, IMAGE_SPAN).replace(VIDEO_PLACEHOLDER, VIDEO_SPAN)


def render_segments(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                    default_system: str | None = DEFAULT_SYSTEM) -> list[tuple[str, bool]]:
    """``[(text, is_label)]``: concatenated, the rendered conversation; ``is_label`` marks assistant replies."""
    msgs = normalize_messages(messages)
    segments: list[tuple[str, bool]] = []
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    else:
        system = default_system
    prompt = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    for m in msgs:
        if m["role"] == "user":
            prompt += f"{IM_START}user\n{_expand_placeholders(m['content'])}{IM_END}\n{IM_START}assistant\n"
        else:
            if not prompt and segments and segments[-1][1]:
                raise ConversationError("two assistant messages in a row")
            if prompt:
                segments.append((prompt, False))
                prompt = ""
            elif not segments:
                raise ConversationError("conversation starts with an assistant message")
            segments.append((f"{_expand_placeholders(m['content'])}{IM_END}\n", True))
    if prompt:
        if add_generation_prompt or not prompt.endswith(f"{IM_START}assistant\n"):
            segments.append((prompt, False))
        else:
            # A trailing user turn without a generation prompt: drop the assistant header it would open.
            segments.append((prompt[: -len(f"{IM_START}assistant\n")], False))
    elif add_generation_prompt:
        segments.append((f"{IM_START}assistant\n", False))
    return segments


def render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
           default_system: str | None = DEFAULT_SYSTEM) -> str:
    """The conversation as one string (pads shown once, before expansion)."""
    return "".join(t for t, _ in render_segments(messages, add_generation_prompt, default_system))
