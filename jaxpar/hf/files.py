"""Reading the JSON files of a model directory with one-line errors."""
from __future__ import annotations

import json
import os

from jaxpar.errors import ConfigError


def json_object(path: str) -> dict:
    """A JSON file that must hold an object; an absent file is {}."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
