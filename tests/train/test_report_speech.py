"""The speech section of the demo report: WER, the silence control's words, playable utterances."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

import pytest

from mm_llama.train.report_speech import (
    SPEECH, metric_rows, section_html, summarize, utterance_wer, word_count,
)
from tests.train.report_helpers import INJECTION, shard_samples, speech_evals


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return SPEECH.read(speech_evals(tmp_path_factory.mktemp("speech"), n=3))


def test_words_and_wer_as_the_metric_counts_them() -> None:
    assert word_count("") == 0 and word_count("uh") == 0 and word_count("Hmm.") == 0  # fillers are no words
    assert word_count("The red circle!") == 3
    assert utterance_wer("red circle", "big red circle") == pytest.approx(1 / 3)
    assert utterance_wer("one two nine", "129") == 0.0  # numbers are normalised as the corpus WER does
    assert utterance_wer("A red square.", "a red square") == 0.0
    assert utterance_wer("anything", "uh") is None  # a reference without words has no WER


def test_summary_counts_the_words_predicted_on_silence(results: dict[str, dict[str, Any]]) -> None:
    part = summarize(results)
    # silence predictions "", "uh", "red circle": 2 words, 2 of 3 utterances without a word
    assert part["metrics"]["silence_words"] == 2
    assert part["metrics"]["silence_empty_share"] == pytest.approx(2 / 3)
    assert part["samples"] == {"utterances": 3, "silence_utterances": 3, "silence_with_words": 1}
    assert part["metrics"]["wer"] == results["asr"]["metrics"]["wer"] > 0
    assert part["metrics"]["silence_wer"] == results["asr_silence"]["metrics"]["wer"]
    rows = dict(metric_rows(part))
    assert rows["silence: utterances with no word predicted"] == "66.7% (2 of 3; 2 words predicted in all)"
    assert rows["ASR word error rate (3 test utterances)"] == f"{100 * part['metrics']['wer']:.1f}%"


def test_section_embeds_each_utterance_as_in_the_shard(results: dict[str, dict[str, Any]]) -> None:
    page = section_html(results, summarize(results), limit=5)
    records = results["asr"]["records"]
    shard = dict(shard_samples(Path(records[0]["shard"])))
    clips = re.findall(r'<audio controls preload="metadata" data-key="([^"]+)" src="data:audio/flac;base64,([^"]+)">',
                       page)
    assert [(key, base64.b64decode(b)) for key, b in clips] == [(r["key"], shard[r["key"]]["flac"]) for r in records]
    assert all(f"<td>{html.escape(r['reference'])}</td>" in page for r in records)
    assert INJECTION not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # per utterance: exact (0 %), the first of 9 words dropped (11.1 %)
    assert "<td>0.0%</td>" in page and "<td>11.1%</td>" in page
    assert page.count('<td class="muted"><span class="muted">(empty)</span></td>') == 1
    assert '<td class="muted">uh</td>' in page and '<td class="muted">red circle</td>' in page
    assert section_html(results, summarize(results), limit=1).count("<audio ") == 1


def test_missing_audio_is_named(tmp_path: Path, results: dict[str, dict[str, Any]]) -> None:
    moved = {**results, "asr": {**results["asr"], "records": [{**r, "shard": str(tmp_path / "gone.tar")}
                                                               for r in results["asr"]["records"]]}}
    page = section_html(moved, summarize(results), limit=2)
    assert page.count("(audio not found)") == 2 and "<audio" not in page
