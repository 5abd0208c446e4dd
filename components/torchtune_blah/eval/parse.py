"""Reading the answer out of the model's reply, leniently, as llama-squad did (JSON5)."""

from typing import Optional

import json5


def extract_answer(text: str) -> Optional[str]:
    """The ``answer`` string of the first ``{...}`` block in ``text``, or None.

    JSON5 accepts what models often write (single quotes, trailing commas,
    unquoted keys). Anything that is not an object with a string ``answer`` is
    invalid (None): never read as an abstention.
    """
    start = text.find("{")
    if start < 0:
        return None
    end = text.find("}", start)
    if end < 0:
        return None
    try:
        obj = json5.loads(text[start:end + 1])
    except ValueError:
        return None
    answer = obj.get("answer") if isinstance(obj, dict) else None
    return answer if isinstance(answer, str) else None
