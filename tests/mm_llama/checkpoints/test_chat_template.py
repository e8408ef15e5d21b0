"""A checkpoint's own chat template is read and compared with mm-llama's Llama 3 prompt layout."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from mm_llama.checkpoints.chat_template import (
    PROBE, ChatTemplateWarning, check_chat_template, read_chat_template, render_probe,
)
from mm_llama.checkpoints.serving_files import CHAT_TEMPLATE, write_tokenizer_files
from mm_llama.data.prompts import chat_prompt_ids
from mm_llama.media_tokens import MediaTokens
from mm_llama.tiny_checkpoint import sample_sentences
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer

# The shape of the published Llama 3.1 / 3.2 instruct templates: a dated system turn before the user's.
DATED = (
    "{{- bos_token }}{%- set date_string = '26 Jul 2024' %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] | trim }}{%- endif %}{%- endfor %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_llama3_tokenizer(sample_sentences(), 300, path)
    return path


def _with_template(root: Path, name: str, files: dict[str, str]) -> Path:
    directory = root / name
    directory.mkdir()
    for file, text in files.items():
        (directory / file).write_text(text)
    return directory


def test_our_template_renders_the_ids_our_prompt_builder_makes(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_dir(tokenizer_dir)
    media = MediaTokens(tok.vocab_size)
    ids = chat_prompt_ids(tok, media, [media.image], "What is in the picture?", system="You are a helpful assistant.")
    rendered = render_probe(CHAT_TEMPLATE)
    before, _, after = rendered.partition("<|image|>")
    assert ids == tok.encode(before, allow_special=True) + [media.image] + tok.encode(after, allow_special=True)


def test_render_probe_agrees_with_transformers_apply_chat_template(tokenizer_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    for template in (CHAT_TEMPLATE, DATED):
        theirs = hf.apply_chat_template(PROBE, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert render_probe(template) == theirs


def test_an_exported_template_agrees_and_gives_no_warning(tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    write_tokenizer_files(tokenizer_dir, out, image_id=None, chat=True, max_len=64)
    assert read_chat_template(out) == (CHAT_TEMPLATE, out / "chat_template.jinja")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_chat_template(out) is None
    assert check_chat_template(tokenizer_dir) is None  # no template at all


def test_another_template_is_read_from_each_place_and_warned_about_once(tmp_path: Path) -> None:
    places = {
        "jinja": {"chat_template.jinja": DATED},
        "json": {"chat_template.json": json.dumps({"chat_template": DATED})},
        "config": {"tokenizer_config.json": json.dumps({"chat_template": DATED})},
        "named": {"tokenizer_config.json": json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                                         {"name": "default", "template": DATED}]})},
    }
    for name, files in places.items():
        directory = _with_template(tmp_path, name, files)
        assert read_chat_template(directory) == (DATED, directory / next(iter(files)))
        with pytest.warns(ChatTemplateWarning, match=r"Cutting Knowledge Date.*Llama 3 chat format|"
                                                     r"Llama 3 chat format.*Cutting Knowledge Date") as caught:
            message = check_chat_template(directory)
        assert len(caught) == 1 and str(directory) in message and "You are a helpful assistant." in message
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert check_chat_template(directory) == message  # the second look does not warn again


def test_a_template_that_does_not_render_is_named(tmp_path: Path) -> None:
    bad = _with_template(tmp_path, "bad", {"chat_template.jinja": "{{ raise_exception('only user turns') }}"})
    with pytest.warns(ChatTemplateWarning, match=r"chat_template\.jinja: the chat template does not render.*only user"):
        check_chat_template(bad)
    broken = _with_template(tmp_path, "broken", {"tokenizer_config.json": "{not json"})
    with pytest.raises(ValueError, match=r"cannot read .*tokenizer_config\.json"):
        read_chat_template(broken)
