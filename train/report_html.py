"""HTML fragments of the demo report: escaping, data URIs, correct/wrong marks and the page's style.

Every piece of text that reaches the page goes through `esc` (``html.escape``, quotes included), so a
model's output or a question can never add markup.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["STYLE", "data_uri", "esc", "mark", "question_table", "text"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.sample { display: flex; gap: 1.2em; border-top: 1px solid #ddd; padding: 1em 0; }
.sample img { image-rendering: pixelated; border: 1px solid #999; }
img.still, img.clip { width: 192px; height: auto; } img.strip { width: 384px; height: auto; }
audio { width: 20em; }
.ok { color: #087f23; font-weight: bold; } .bad { color: #b00020; font-weight: bold; }
.muted { color: #777; } .curves img { margin: 0 1em 1em 0; }
"""


def esc(value: Any) -> str:
    """``str(value)`` escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def data_uri(data: bytes, mime: str) -> str:
    """``data:MIME;base64,...`` of ``data`` (``mime`` such as ``image/png``, ``audio/flac``)."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def text(prediction: Any) -> str:
    """An escaped prediction; an empty or missing one is shown as ``(empty)``."""
    return esc(prediction) if prediction else '<span class="muted">(empty)</span>'


def mark(score: float) -> str:
    """A green tick for a score of 1, a red cross for 0, the score itself in between."""
    if score >= 1.0:
        return '<span class="ok">&#10003;</span>'
    if score <= 0.0:
        return '<span class="bad">&#10007;</span>'
    return f"{score:.2f}"


def question_table(questions: Iterable[Mapping[str, Any]], control: str, control_key: str,
                   type_note: Callable[[str], str] = lambda qtype: "") -> str:
    """A table of a sample's questions: question, type (+ ``type_note(type)``, HTML), the model's answer, the
    references, a mark, and the answer under the control (``question[control_key]``, headed ``control``)."""
    rows = [f"<table><tr><th>question</th><th>type</th><th>model</th><th>reference</th><th></th>"
            f"<th>{esc(control)}</th></tr>"]
    for q in questions:
        qtype = q.get("type") or ""
        rows.append(f"<tr><td>{esc(q['question'])}</td><td>{esc(qtype)}{type_note(qtype)}</td>"
                    f"<td>{text(q['prediction'])}</td><td>{esc(' / '.join(q['references']))}</td>"
                    f"<td>{mark(float(q.get('score', 0.0)))}</td>"
                    f"<td class=\"muted\">{text(q.get(control_key))}</td></tr>")
    rows.append("</table>")
    return "".join(rows)
