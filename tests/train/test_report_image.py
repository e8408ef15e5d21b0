"""The image section of the demo report: the summary of the four results and the test images from shards."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

import pytest

from mm_llama.train.report_image import IMAGE, ImageEvals, metric_rows, section_html, summarize
from tests.train.report_helpers import INJECTION, image_evals, shard_samples


@pytest.fixture(scope="module")
def evals(tmp_path_factory: pytest.TempPathFactory) -> ImageEvals:
    return image_evals(tmp_path_factory.mktemp("image"), n=2)


@pytest.fixture(scope="module")
def results(evals: ImageEvals) -> dict[str, dict[str, Any]]:
    return IMAGE.read(evals)


def test_summary_holds_the_real_numbers_beside_the_blank_control(results: dict[str, dict[str, Any]]) -> None:
    part = summarize(results)
    n = len(results["vqa"]["records"])  # one question per type per image; only the first one is answered wrong
    assert part["samples"] == {"vqa": n, "caption": 2}
    m = part["metrics"]
    assert m["vqa_accuracy"] == pytest.approx((n - 1) / n) and m["blank_vqa_accuracy"] == 0.0
    assert (m["caption_cider"], m["blank_caption_cider"], m["caption_exact_match"]) == (1.5, 0.25, 0.0)
    first = results["vqa"]["records"][0]["type"]
    assert part["vqa_by_type"][first]["vqa_accuracy"] == 0.5  # 2 images, one question of each type
    assert all(t["blank_vqa_accuracy"] == 0.0 and t["samples"] == 2 for t in part["vqa_by_type"].values())
    rows = dict(metric_rows(part))
    assert rows[f"VQA accuracy ({n} test questions)"] == f"{100 * (n - 1) / n:.1f}%"
    assert rows["caption CIDEr (2 test images)"] == "1.500" and rows["caption CIDEr, blank images"] == "0.250"
    assert rows[f"VQA accuracy, type {first} (2)"].startswith("50.0% (blank 0.0%, majority ")


def test_section_embeds_each_shard_image_and_escapes_every_text(evals: ImageEvals,
                                                               results: dict[str, dict[str, Any]]) -> None:
    page = section_html(results, summarize(results), limit=5)
    pngs = [base64.b64decode(b) for b in re.findall(r'<img class="still" src="data:image/png;base64,([^"]+)"', page)]
    shard = Path(results["caption"]["records"][0]["shard"])
    assert pngs == [members["png"] for _, members in shard_samples(shard)]  # both images, bytes as in the shard
    assert INJECTION not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "A &lt;red&gt; square &amp; more" in page and "grey &amp; co" in page
    assert page.count("(empty)") == 2  # the blank-image captions
    questions = results["vqa"]["records"]
    assert all(f"<td>{html.escape(q['question'])}</td>" in page for q in questions)
    assert page.count('<span class="ok">') == len(questions) - 1 and page.count('<span class="bad">') == 1
    assert "1 images shown" in section_html(results, summarize(results), limit=1)


def test_wrong_task_or_class_is_refused(tmp_path: Path, evals: ImageEvals) -> None:
    swapped = ImageEvals(vqa=evals.caption, vqa_blank=evals.vqa_blank, caption=evals.caption,
                         caption_blank=evals.caption_blank)
    with pytest.raises(ValueError, match=r"vqa: expected a vqa evaluation result in .*, got task 'caption'"):
        IMAGE.read(swapped)
    with pytest.raises(TypeError, match=r"image= takes ImageEvals\(...\), got dict"):
        IMAGE.read({"vqa": evals.vqa})
    with pytest.raises(ValueError, match="cannot read the vqa evaluation result"):
        IMAGE.read(ImageEvals(tmp_path / "nope.json", evals.vqa_blank, evals.caption, evals.caption_blank))
