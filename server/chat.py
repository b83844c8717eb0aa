"""The plain-text rendering of chat messages for a base model (/v1/chat/completions).

These models are base models, not chat models: a conversation is written out as a plain text that a
Japanese text of that shape would continue, and the sample is cut at the next turn marker.  The default:

    {system messages, each followed by a blank line}
    ユーザー: {a user message}
    アシスタント: {an assistant message}
    ...
    アシスタント:

and the sample stops before a line that starts "ユーザー" or "アシスタント" (the next turn).  A template
file (gpt2-server.py --chat_template FILE) replaces it: a JSON object with any of the keys of
``ChatTemplate`` (the others keep their default); "system", "user" and "assistant" are Python
``str.format`` templates with one field, {content}; "generation" is the text the model continues;
"stop" the strings that end a sample (besides the request's own).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import List, Tuple


@dataclass(frozen=True)
class ChatTemplate:
    system: str = "{content}\n\n"
    user: str = "ユーザー: {content}\n"
    assistant: str = "アシスタント: {content}\n"
    generation: str = "アシスタント:"
    stop: Tuple[str, ...] = ("\nユーザー", "\nアシスタント")

    def render(self, messages: List[Tuple[str, str]]) -> str:
        """The text of (role, content) messages (roles: system, user, assistant), then ``generation``."""
        return "".join(getattr(self, role).format(content=content) for role, content in messages) + self.generation


def load_template(path: str) -> ChatTemplate:
    """The ChatTemplate of a JSON file; ValueError with one line saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    names = [f.name for f in fields(ChatTemplate)]
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object with some of the keys {', '.join(names)}")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (the keys are {', '.join(names)})")
    for name in ("system", "user", "assistant", "generation"):
        if name in data and not isinstance(data[name], str):
            raise ValueError(f"{path}: {name!r} must be a string")
    for name in ("system", "user", "assistant"):
        if name in data:
            try:
                data[name].format(content="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"{path}: {name!r} must be a str.format template whose only field is "
                                 f"{{content}} (write {{{{ and }}}} for braces): {e!r}") from None
    if "stop" in data:
        stop = data["stop"]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"{path}: 'stop' must be a list of non-empty strings")
        data["stop"] = tuple(stop)
    return replace(ChatTemplate(), **data)
