"""A checkpoint's own chat template, read and compared with the prompts mm-llama builds.

mm-llama builds every prompt in the Llama 3 chat format (`mm_llama.data.prompts`: BOS, per turn a header,
the content with the media first, ``<|eot_id|>``, an open assistant header), the layout its exports write
as `CHAT_TEMPLATE`. A Hugging Face directory may carry its own template (``chat_template.jinja``,
``chat_template.json`` or ``tokenizer_config.json``'s ``chat_template``); :func:`check_chat_template`
renders it (with jinja2, as transformers' ``apply_chat_template`` does) on a probe conversation and, when the
result is not what mm-llama's prompt builder gives, warns once per directory with both renderings, so a
user knows that mm-llama's answers follow the Llama 3 format and not that template (e.g. the published
Llama 3.1 / 3.2 instruct templates add a "Cutting Knowledge Date" system turn).
"""

from __future__ import annotations

import json
import warnings
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

from mm_llama.checkpoints.serving_files import CHAT_TEMPLATE

__all__ = ["ChatTemplateWarning", "check_chat_template", "read_chat_template", "render_probe"]

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
"""Where a template is looked for, in transformers' order of precedence."""

PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
]
"""The conversation both templates render: a system turn, then an image and a question."""


class ChatTemplateWarning(UserWarning):
    """A checkpoint's chat template formats prompts differently from mm-llama's Llama 3 prompt builder."""


def _from_json(path: Path, key: str = "chat_template") -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"cannot read {path}: {err}; fix or remove the file") from err
    if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def read_chat_template(directory: str | Path) -> tuple[str, Path] | None:
    """``(template, file it came from)`` of a model directory, or None when it has none."""
    directory = Path(directory)
    for name in TEMPLATE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        template = path.read_text(encoding="utf-8") if name.endswith(".jinja") else _from_json(path)
        if template is not None and template.strip():
            return template, path
    return None


def render_probe(template: str) -> str:
    """`template` rendered on `PROBE` with a generation prompt, in a jinja2 sandbox with the names
    transformers provides (``bos_token``, ``raise_exception``, ``strftime_now``, ...). Raises ValueError when
    the template does not render."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: date.today().strftime(fmt))
    try:
        return env.from_string(template).render(
            messages=PROBE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", add_generation_prompt=True)
    except jinja2.TemplateError as err:
        raise ValueError(f"the chat template does not render a system + image + question conversation: {err}") from err


def _shown(text: str, limit: int = 400) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


@lru_cache(maxsize=64)
def _message(directory: Path) -> str | None:
    found = read_chat_template(directory)
    if found is None:
        return None
    template, path = found
    ours = render_probe(CHAT_TEMPLATE)
    try:
        theirs = render_probe(template)
    except ImportError:  # no jinja2: only a template identical to ours is known to agree
        return None if template.strip() == CHAT_TEMPLATE else (
            f"{path} holds a chat template mm-llama could not render (jinja2 is not installed) and that is not "
            "mm-llama's Llama 3 template; mm-llama prompts in the Llama 3 chat format regardless")
    except ValueError as err:
        return f"{path}: {err}; mm-llama prompts in the Llama 3 chat format regardless"
    if theirs == ours:
        return None
    return (f"the chat template in {path} formats prompts differently from mm-llama, which always prompts in the "
            f"Llama 3 chat format (mm_llama.data.prompts). On a system turn + image + question the template gives "
            f"{_shown(theirs)}, mm-llama {_shown(ours)}; answers may differ from transformers' apply_chat_template. "
            "To prompt with the template's extra text, put it in the prompt or the system turn yourself")


_warned: set[Path] = set()


def check_chat_template(directory: str | Path) -> str | None:
    """Warn (`ChatTemplateWarning`, once per directory and process) when ``directory``'s chat template does not
    give mm-llama's Llama 3 prompt layout; returns the message, or None when there is no template or it agrees."""
    resolved = Path(directory).resolve()
    message = _message(resolved)
    if message is not None and resolved not in _warned:
        _warned.add(resolved)
        warnings.warn(message, ChatTemplateWarning, stacklevel=2)
    return message
