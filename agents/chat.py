"""Dialogues between an environment and a VLM policy, as data.

An environment episode is a dialogue: the observation texts are the user turns (the task prompt at
reset, feedback after a failed attempt), the model's responses are the assistant turns, and the
observation image belongs to the first user turn. `Dialogue` holds exactly that and converts it to the
message list a Hugging Face chat template takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from agents.vision_inputs import ImageLike

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatTurn:
    """One message of a dialogue.

    Attributes:
        role: ``"system"``, ``"user"`` (environment observation text) or ``"assistant"`` (model response).
        text: the message text.
    """

    role: Role
    text: str


@dataclass(frozen=True, eq=False)
class Dialogue:
    """An environment/model dialogue: optional system turn, then user and assistant turns alternating.

    Attributes:
        turns: the messages in order. After an optional leading system turn, turns alternate
            user, assistant, user, ... starting with a user turn.
        image: the observation image shown with the first user turn, or ``None`` for text only.

    Example:
        >>> dialogue = Dialogue.start("Compute 24 from the cards.", image=observation["image"])
        >>> dialogue = dialogue.with_assistant('{"formula": "(10+2)*2"}').with_user("Wrong cards, try again.")
    """

    turns: tuple[ChatTurn, ...]
    image: ImageLike | None = None

    def __post_init__(self) -> None:
        conversation = self.turns[1:] if self.turns and self.turns[0].role == "system" else self.turns
        for index, turn in enumerate(conversation):
            expected = "user" if index % 2 == 0 else "assistant"
            if turn.role != expected:
                raise ValueError(
                    f"dialogue turns must alternate user/assistant after an optional system turn; turn "
                    f"{index} is {turn.role!r} where {expected!r} was expected"
                )
        if self.image is not None and not conversation:
            raise ValueError("a dialogue with an image needs a user turn to attach it to")

    @classmethod
    def start(cls, prompt: str, *, image: ImageLike | None = None, system: str | None = None) -> Dialogue:
        """A new dialogue whose first user turn is `prompt` (shown with `image`), after an optional system turn."""
        turns = (ChatTurn("system", system),) if system is not None else ()
        return cls(turns=(*turns, ChatTurn("user", prompt)), image=image)

    def with_assistant(self, text: str) -> Dialogue:
        """This dialogue followed by an assistant turn."""
        return Dialogue(turns=(*self.turns, ChatTurn("assistant", text)), image=self.image)

    def with_user(self, text: str) -> Dialogue:
        """This dialogue followed by a user turn."""
        return Dialogue(turns=(*self.turns, ChatTurn("user", text)), image=self.image)

    def to_messages(self) -> list[dict[str, Any]]:
        """Hugging Face chat messages; the first user turn's content is ``[image part, text part]``.

        The image part is a ``{"type": "image"}`` placeholder: chat templates only render it as the
        image marker (``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen); the pixels travel
        separately.
        """
        messages: list[dict[str, Any]] = []
        image_pending = self.image is not None
        for turn in self.turns:
            if turn.role == "user" and image_pending:
                content: Any = [{"type": "image"}, {"type": "text", "text": turn.text}]
                image_pending = False
            else:
                content = turn.text
            messages.append({"role": turn.role, "content": content})
        return messages
