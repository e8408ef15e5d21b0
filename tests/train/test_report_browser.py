"""The demo report in a real browser: headless Chromium (Debian's package, `make install` adds it) opens a
report with all three modalities and every embedded image, animated clip and utterance must load.

The check itself is proven to fail: a copy of the page with one broken image and one broken audio data
URI must report exactly those two as not loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from mm_llama.train.report import write_report
from tests.train.headless_chromium import HeadlessChromium
from tests.train.report_helpers import image_evals, loss_run, speech_evals, video_evals

MEDIA_CHECK = """(async () => {
  const images = await Promise.all([...document.images].map(async (img) => {
    let decoded = true, frames = null;
    try { await img.decode(); } catch (e) { decoded = false; }
    if (decoded && img.classList.contains("clip")) {  // an animated GIF: count and decode its frames
      try {
        const data = await (await fetch(img.src)).arrayBuffer();
        const decoder = new ImageDecoder({data, type: "image/gif"});
        await decoder.tracks.ready;
        frames = decoder.tracks.selectedTrack.frameCount;
        await decoder.decode({frameIndex: frames - 1});
      } catch (e) { frames = String(e); }
    }
    return {tag: "img", cls: img.className, alt: img.alt, width: img.naturalWidth, frames,
            ok: decoded && img.complete && img.naturalWidth > 0};
  }));
  const audios = await Promise.all([...document.querySelectorAll("audio")].map((a) => new Promise((resolve) => {
    const report = () => resolve({tag: "audio", key: a.dataset.key, readyState: a.readyState,
                                  duration: Number.isFinite(a.duration) ? a.duration : null,
                                  error: a.error ? a.error.code : null,
                                  ok: !a.error && a.readyState >= 1 && a.duration > 0});
    if (a.error || a.readyState >= 1) { report(); return; }
    a.addEventListener("loadedmetadata", report, {once: true});
    a.addEventListener("error", report, {once: true});
    setTimeout(report, 15000);
  })));
  return [...images, ...audios];
})()"""
"""Runs in the page: one entry per <img> (decoded, naturalWidth > 0; for animated clips the GIF's frame
count, its last frame decoded) and per <audio> (metadata loaded: readyState >= 1, a duration > 0, no error)."""


BROKEN = "QlJPS0VOIQ=="
"""base64 of ``BROKEN!``: what replaces a data URI's payload in the copy that must fail."""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    write_report(root, image=image_evals(root, n=2), video=video_evals(root, n=2), speech=speech_evals(root, n=2),
                 runs={"lm": loss_run(root)}, stage_seconds={"lm": 1.0}, settings={}, report_samples=2)
    return root / "report.html"


def _media(browser: HeadlessChromium, page: Path) -> list[dict[str, Any]]:
    return browser.evaluate_page(page.as_uri(), MEDIA_CHECK)


def test_every_embedded_medium_loads_in_chromium(report: Path, tmp_path: Path) -> None:
    page = report.read_text()
    with HeadlessChromium() as browser:
        media = _media(browser, report)
        # a copy with the first clip's GIF and the first utterance's FLAC replaced by bytes that decode to nothing
        broken = re.sub(r'(class="clip" src="data:image/gif;base64,)[^"]+', rf"\g<1>{BROKEN}", page, count=1)
        broken = re.sub(r'(<audio [^>]*src="data:audio/flac;base64,)[^"]+', rf"\g<1>{BROKEN}", broken, count=1)
        assert broken.count(f',{BROKEN}"') == 2
        (tmp_path / "broken.html").write_text(broken)
        broken_media = _media(browser, tmp_path / "broken.html")
    images = [m for m in media if m["tag"] == "img"]
    audios = [m for m in media if m["tag"] == "audio"]
    assert sorted(m["cls"] for m in images) == ["clip", "clip", "curve", "still", "still", "strip", "strip"]
    assert len(audios) == 2
    assert [m for m in media if not m["ok"]] == []
    assert all(isinstance(m["frames"], int) and m["frames"] > 1 for m in images if m["cls"] == "clip"), images
    assert all(m["duration"] > 1.0 for m in audios), audios  # the utterances last seconds
    failed = [(m["tag"], m.get("cls")) for m in broken_media if not m["ok"]]
    assert failed == [("img", "clip"), ("audio", None)], broken_media
