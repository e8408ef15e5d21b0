"""The speech part of the demo report: ASR beside its silence control, with the utterances playable.

The silence control (`evaluate_speech(blank_audio=True)`) replaces every utterance by silence of the same
length: a model that listens should then produce no words. Words are counted as the word error rate
counts them, after Whisper's English normalisation (`normalize_english`), so filler words and
punctuation are not words.

metrics.json's ``speech`` part (`summarize`)::

    {"metrics": {"wer", "silence_wer", "silence_words", "silence_empty_share"},
     "samples": {"utterances", "silence_utterances", "silence_with_words"}}

``wer`` / ``silence_wer``: corpus WER (a fraction, may exceed 1); ``silence_words``: words predicted on
silence, all utterances together; ``silence_empty_share``: the share of silent utterances whose prediction
has no word (1.0 is the ideal); ``silence_with_words``: how many silent utterances got at least one word.

The HTML section shows the first utterances: each clip is embedded as it is in the shard (``KEY.flac``,
as the ``speech`` kind writes it) in an ``<audio controls>``, beside the reference, the prediction, the
prediction on silence and the utterance's own WER.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_llama.train.report_common import Modality, Results, pct, shard_members
from mm_llama.train.report_html import data_uri, esc, text

__all__ = ["AUDIO_TYPES", "SPEECH", "SpeechEvals", "metric_rows", "section_html", "summarize", "utterance_wer",
           "word_count"]

AUDIO_TYPES: dict[str, str] = {"flac": "audio/flac", "wav": "audio/wav", "mp3": "audio/mpeg", "ogg": "audio/ogg",
                               "opus": "audio/ogg"}
"""Audio member extensions looked for in a shard, in this order, with the MIME type of their data URI."""


@dataclass(frozen=True)
class SpeechEvals:
    """`write_result` files of the speech evaluations: ``asr`` on the utterances (``asr``) and the same
    with every utterance replaced by silence of its length (``asr_silence``, ``blank_audio=True``)."""

    asr: Path
    asr_silence: Path


TASKS = {"asr": "asr", "asr_silence": "asr"}


def word_count(prediction: str) -> int:
    """Words of a prediction as the WER counts them (after `normalize_english`)."""
    from mm_llama.train.speech_evaluation import normalize_english

    return len(normalize_english(prediction).split())


def utterance_wer(prediction: str, reference: str) -> float | None:
    """The WER of one utterance; None when its reference has no word after normalisation."""
    from mm_llama.train.speech_evaluation import word_error_rate

    try:
        return word_error_rate([prediction], [reference])
    except ValueError:
        return None


def summarize(results: Results) -> dict[str, Any]:
    """The ``speech`` part of metrics.json (see the module docstring) from the asr and silence results."""
    asr, silence = results["asr"], results["asr_silence"]
    words = [word_count(r["prediction"]) for r in silence["records"]]
    metrics = {
        "wer": asr["metrics"]["wer"],
        "silence_wer": silence["metrics"]["wer"],
        "silence_words": sum(words),
        "silence_empty_share": sum(1 for w in words if w == 0) / len(words) if words else None,
    }
    samples = {"utterances": asr["counts"]["samples"], "silence_utterances": silence["counts"]["samples"],
               "silence_with_words": sum(1 for w in words if w > 0)}
    return {"metrics": metrics, "samples": samples}


def metric_rows(part: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` metric-table rows of the ``speech`` part of metrics.json."""
    m, n = part["metrics"], part["samples"]
    return [
        (f"ASR word error rate ({n['utterances']} test utterances)", pct(m["wer"])),
        ("ASR word error rate, silence", pct(m["silence_wer"])),
        ("silence: utterances with no word predicted",
         f"{pct(m['silence_empty_share'])} ({n['silence_utterances'] - n['silence_with_words']} of "
         f"{n['silence_utterances']}; {m['silence_words']} words predicted in all)"),
    ]


def utterances(results: Results, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` asr records, each with ``audio`` (the shard member's bytes, or None), ``mime``,
    ``silence`` (the prediction on silence) and ``wer`` (`utterance_wer`)."""
    shown = results["asr"]["records"][:limit]
    silence = {r["key"]: r["prediction"] for r in results["asr_silence"]["records"]}
    members = shard_members((r["shard"], f"{r['key']}.{ext}") for r in shown for ext in AUDIO_TYPES)
    out = []
    for r in shown:
        found = next(((members[(r["shard"], f"{r['key']}.{ext}")], mime) for ext, mime in AUDIO_TYPES.items()
                      if (r["shard"], f"{r['key']}.{ext}") in members), (None, None))
        out.append({**r, "audio": found[0], "mime": found[1], "silence": silence.get(r["key"]),
                    "wer": utterance_wer(r["prediction"], r["reference"])})
    return out


def _utterance_html(u: Mapping[str, Any]) -> str:
    key = esc(u["key"])
    audio = (f'<audio controls preload="metadata" data-key="{key}" src="{data_uri(u["audio"], u["mime"])}"></audio>'
             if u.get("audio") else '<span class="muted">(audio not found)</span>')
    wer = pct(u["wer"]) if u["wer"] is not None else "n/a"
    return (f'<tr><td>{audio}<br><span class="muted">{key}</span></td><td>{esc(u["reference"])}</td>'
            f'<td>{text(u["prediction"])}</td><td>{esc(wer)}</td><td class="muted">{text(u.get("silence"))}</td></tr>')


def section_html(results: Results, part: Mapping[str, Any], limit: int) -> str:
    """The speech section: what the silence control means, then the first ``limit`` utterances."""
    shown = utterances(results, limit)
    rows = "".join(_utterance_html(u) for u in shown)
    return "".join([
        f"<h2>Speech ({part['samples']['utterances']} test utterances; {len(shown)} shown)</h2>",
        "<p>The silence column is the same prompt with the utterance replaced by silence of its length: a "
        "model that listens writes nothing there. WER is counted after Whisper's English normalisation.</p>",
        "<table><tr><th>utterance</th><th>reference</th><th>model</th><th>WER</th><th>silence</th></tr>",
        rows, "</table>"])


SPEECH = Modality("speech", SpeechEvals, TASKS, summarize, metric_rows, section_html)
"""The speech section of the report (`report.write_report`'s ``speech=``)."""
