"""tokenizer.json through the `tokenizers` library, with the chat template of tokenizer_config.json."""
from __future__ import annotations

import json
import os

from jaxpar.errors import ConfigError, GenerationError
from jaxpar.hf.files import json_object


class HFTokenizer:
    def __init__(self, directory: str, eos_ids: tuple):
        from tokenizers import Tokenizer
        path = os.path.join(directory, "tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exceptions
            raise ConfigError(f"{path}: cannot read tokenizer: {str(e).splitlines()[0]}") from None
        self.config = json_object(os.path.join(directory, "tokenizer_config.json"))
        jinja = os.path.join(directory, "chat_template.jinja")  # where current transformers saves it
        self.template = open(jinja).read() if os.path.isfile(jinja) else self.config.get("chat_template")
        if isinstance(self.template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.template if isinstance(t, dict)}
            self.template = named.get("default")
        self.directory = directory
        self.vocab_size = self._tok.get_vocab_size()
        eos = self._special("eos_token")
        self.eos_ids = tuple(eos_ids) or ((eos,) if eos is not None else ())
        self.bos_id = self._special("bos_token")
        self.pad_id = self._special("pad_token") or 0

    def _special(self, key):
        tok = self.config.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return self._tok.token_to_id(tok) if isinstance(tok, str) else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def chat(self, text: str) -> list[int]:
        """The prompt as one user turn of the model's chat template, ready for the assistant's reply."""
        return self.render_chat([{"role": "user", "content": text}])

    def render_chat(self, messages: list[dict], what: str = "--chat") -> list[int]:
        """Turns ({"role", "content"} dicts: system, user, assistant) through the model's chat template, ending
        with the assistant's turn opened (add_generation_prompt). what: how errors name the caller."""
        if not isinstance(self.template, str) or not self.template:
            raise GenerationError(f"{what}: {self.directory} has no chat template (chat_template.jinja or "
                                  f"chat_template in tokenizer_config.json)")
        import datetime

        import jinja2
        import jinja2.sandbox

        def raise_exception(message):
            raise GenerationError(f"{what}: the chat template refused the messages: {message}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.config.items()
                   if k.endswith("_token")}
        try:
            rendered = env.from_string(self.template).render(messages=messages, add_generation_prompt=True,
                                                             **special)
        except jinja2.TemplateError as e:
            raise GenerationError(f"{what}: cannot render the chat template of {self.directory}: {e}") from None
        return self._tok.encode(rendered, add_special_tokens=False).ids


class NoTokenizer:
    """A model directory without tokenizer.json: token ids work, text does not."""
    vocab_size = 0
    bos_id = None
    pad_id = 0
    eos_ids = ()

    def __init__(self, directory: str):
        self.directory = directory

    def encode(self, text, add_bos=True):
        raise GenerationError(f"{self.directory}: no tokenizer.json, so text prompts cannot be encoded")

    chat = encode

    def render_chat(self, messages, what="--chat"):
        raise GenerationError(f"{what}: {self.directory} has no tokenizer.json, so chat messages cannot be encoded")

    def decode(self, ids):
        raise GenerationError(f"{self.directory}: no tokenizer.json, so token ids cannot be decoded to text "
                              f"(generate_tokens returns the ids)")


def load_tokenizer(directory: str, cfg):
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer(directory, cfg.eos_ids)
    return NoTokenizer(directory)
