"""The help layout every `mm-llama` command uses: descriptions and epilogs are wrapped to the terminal as
argparse does, except indented lines (the examples), which print exactly as written so they can be copied."""

from __future__ import annotations

import argparse
import textwrap


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, keeping blank lines between paragraphs and indented lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        paragraph: list[str] = []

        def flush() -> None:
            if paragraph:
                out.append(textwrap.fill(" ".join(" ".join(paragraph).split()), width,
                                         initial_indent=indent, subsequent_indent=indent))
                paragraph.clear()

        for line in text.splitlines():
            if not line.strip():
                flush()
                out.append("")
            elif line[:1].isspace():
                flush()
                out.append(indent + line)
            else:
                paragraph.append(line)
        flush()
        return "\n".join(out)
