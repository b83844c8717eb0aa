"""Reading request bodies: every bad value is an ApiError naming the field (OpenAI's error object)."""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Union


class ApiError(Exception):
    """An error answered with OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, reason: str) -> ApiError:
    return ApiError(400, f"{param}: {reason}", param=param, code="invalid_value")


def integer(body: dict, name: str, default, minimum: Optional[int] = None, maximum: Optional[int] = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise bad(name, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise bad(name, f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise bad(name, f"must be at most {maximum}, got {value}")
    return value


def number(body: dict, name: str, default: float, minimum: float, maximum: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"must be a number, got {value!r}")
    if not minimum <= value <= maximum:
        raise bad(name, f"must be between {minimum:g} and {maximum:g}, got {value}")
    return float(value)


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {value!r}")
    return value


def choice(body: dict, name: str, default: str, choices: Sequence[str]) -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if value not in choices:
        raise bad(name, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _token_list(value, name: str, n_vocab: int) -> Optional[List[int]]:
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        for t in value:
            if not 0 <= t < n_vocab:
                raise bad(name, f"token id {t} is outside the vocabulary (0..{n_vocab - 1})")
        return list(value)
    return None


def texts_or_tokens(body: dict, name: str, n_vocab: int, required: bool = True) -> List[Union[str, List[int]]]:
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"{name} is required", param=name, code="missing_required_parameter")
        return []
    value = body[name]
    if isinstance(value, str):
        return [value]
    ids = _token_list(value, name, n_vocab)
    if ids is not None:
        return [ids]
    if isinstance(value, list) and value:
        out: List[Union[str, List[int]]] = []
        for item in value:
            if isinstance(item, str):
                out.append(item)
                continue
            ids = _token_list(item, name, n_vocab)
            if ids is None:
                raise bad(name, "must be a string, a list of strings, a list of token ids or a list of such lists")
            out.append(ids)
        return out
    raise bad(name, "must be a string, a list of strings, a list of token ids or a list of such lists"
              + (" (an empty list has nothing to work on)" if value == [] else ""))


def stops(body: dict, max_chars: Optional[int] = None) -> tuple:
    """At most 4 non-empty stop strings (OpenAI's limit), each at most ``max_chars`` characters."""
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > 4 or not all(isinstance(s, str) and s for s in value):
        raise bad("stop", "must be a non-empty string or a list of at most 4 non-empty strings")
    if max_chars is not None:
        for s in value:
            if len(s) > max_chars:
                raise bad("stop", f"a stop string may have at most {max_chars} characters, got {len(s)}")
    return tuple(value)


def as_object(data: Any) -> dict:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data
