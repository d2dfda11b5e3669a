"""The per-pair HTML report: its pictures, tables and slices, and the page in a real browser."""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from dipreg.html_report import (
    FOLDED_RGB,
    PANELS,
    SLICES_PER_PLANE,
    render_html_report,
    slice_positions,
    write_html_report,
)
from dipreg.images import intensity_range, normalise
from dipreg.metric_catalogue import METRICS, metric_info
from dipreg.registration import result_from_displacement
from dipreg.reports import field_plane
from dipreg.synthetic import random_displacement
from dipreg.transforms import Grid, displacement_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class _Page(HTMLParser):
    """The images, sections and scripts of a report page."""

    def __init__(self, text: str):
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.sections: dict[str, dict[str, str]] = {}
        self.body: dict[str, str] = {}
        self.scripts: dict[str, str] = {}
        self._script: str | None = None
        self._section: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = {name: value or "" for name, value in attrs}
        if tag == "img":
            self.images.append({**attributes, "section": self._section or ""})
        elif tag == "section":
            self._section = attributes["id"]
            self.sections[self._section] = attributes
        elif tag == "body":
            self.body = attributes
        elif tag == "script":
            self._script = attributes.get("id", "")

    def handle_data(self, data):
        if self._script is not None:
            self.scripts[self._script] = self.scripts.get(self._script, "") + data

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None

    def panel(self, title: str, section: str = "plane-image") -> np.ndarray:
        """The decoded RGB picture of one panel of a section."""
        source = next(img["src"] for img in self.images if img["section"] == section and img.get("alt") == title)
        return _decode(source)


def _decode(source: str) -> np.ndarray:
    assert source.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"))


def _result(fixed: sitk.Image, field: sitk.Image, **info):
    """A result with ``field`` as its displacement, the moving image a blurred ``fixed``."""
    moving = sitk.DiscreteGaussian(fixed, 2.0)
    return result_from_displacement(fixed, moving, field, {"method": "dip", "options": {"iterations": 3}, **info},
                                    [3.0, 2.0, 1.5])


def test_slice_positions_are_even_and_include_the_centre():
    for size in (7, 24, 25, 144):
        positions = slice_positions(size)
        assert size // 2 in positions and positions == sorted(set(positions))
        assert 0 <= positions[0] and positions[-1] < size
        assert len(positions) == min(size, SLICES_PER_PLANE)
        assert np.ptp(np.diff(positions)) <= 1  # evenly spaced up to rounding


def test_field_plane_takes_the_in_plane_components():
    field = np.random.default_rng(0).standard_normal((3, 4, 5, 6))  # x, y, z components on a z, y, x grid
    np.testing.assert_array_equal(field_plane(field, 0, 2), field[[0, 1], 2])  # axial: x, y
    np.testing.assert_array_equal(field_plane(field, 1, 3), field[[0, 2], :, 3])  # coronal: x, z
    np.testing.assert_array_equal(field_plane(field, 2, 4), field[[1, 2], :, :, 4])  # sagittal: y, z


def test_folded_voxels_are_marked_on_the_det_j_map(brain_slice):
    """u_x = A sin(2 pi x / W) with A 2 pi / W = 2 folds where cos(2 pi x / W) < -1/2."""
    fixed = sitk.RegionOfInterest(brain_slice, [40, 32], [8, 16])
    fixed.SetSpacing((1.0, 1.0))
    width = fixed.GetSize()[0]
    x = np.arange(width, dtype=np.float64)
    ux = np.broadcast_to(2 * width / (2 * np.pi) * np.sin(2 * np.pi * x / width), (32, width))
    field = displacement_image(np.stack([ux, np.zeros_like(ux)]), Grid.from_image(fixed))
    result = _result(fixed, field)
    folded = sitk.GetArrayFromImage(result.jacobian) <= 0
    analytic = np.broadcast_to(1 + 2 * np.cos(2 * np.pi * x / width) < -0.3, folded.shape)
    assert folded[analytic].all() and folded.mean() < 0.5

    picture = _Page(render_html_report(result)).panel("det J")
    marked = np.all(picture == np.round(np.multiply(FOLDED_RGB, 255)), axis=-1)
    np.testing.assert_array_equal(marked, folded)


def test_report_shows_every_panel_metrics_with_definitions_and_loss_stages(brain_slice):
    result = _result(brain_slice, random_displacement(brain_slice, 3.0, 8.0, seed=1), seconds=1.25, device="cpu",
                     iterations=3)
    page_text = render_html_report(result)
    page = _Page(page_text)
    titles = [img["alt"] for img in page.images if "data-panel" in img]
    assert titles == [panel.title for panel in PANELS if not panel.needs_uncertainty]
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.images)  # self-contained
    scaled = normalise(sitk.GetArrayViewFromImage(brain_slice), intensity_range(brain_slice))
    np.testing.assert_array_equal(page.panel("fixed")[..., 0], np.round(scaled * 255))
    for key in ("ssim", "folding_percent", "sdlogj", "seconds"):
        info = METRICS[key]
        assert f"<td>{info.label}</td><td>{info.format(result.metrics[key])}</td><td>{info.unit}</td>" in page_text
        assert html.escape(info.definition) in page_text
    assert "structural_similarity" in METRICS["ssim"].definition
    assert "alt='loss curves: optimisation'" in page_text  # no stages: the loss history as one stage
    assert "<td>iterations</td><td>3</td>" in page_text and "<td>device</td><td>cpu</td>" in page_text

    result.metrics["loss_stages"] = [{"stage": "affine", "losses": [1.0, 0.5]}, {"stage": "deformable", "losses": [0.4]}]
    assert "alt='loss curves: affine, deformable'" in render_html_report(result)
    result.loss_history, result.metrics["loss_stages"] = [], []
    assert "No loss history" in render_html_report(result)


def test_uncertainty_map_is_shown_when_the_result_has_one(brain_slice):
    result = _result(brain_slice, random_displacement(brain_slice, 3.0, 8.0, seed=1))
    ramp = np.broadcast_to(np.linspace(0.0, 2.0, 64), (64, 64)).astype(np.float32)  # mm, rising to the right
    result.uncertainty = Grid.from_image(brain_slice).to_image(ramp)
    page = _Page(render_html_report(result))
    picture = page.panel("uncertainty").astype(float)
    brightness = picture.sum(-1).mean(0)  # viridis gets brighter with the value
    assert brightness[-1] > brightness[0] + 300 and np.all(np.diff(brightness[:-1]) >= -1)


def test_metric_catalogue_units_and_per_label_dice():
    assert METRICS["epe_mm"].heading == "EPE mm" and METRICS["ssim"].heading == "SSIM"
    assert METRICS["folding_percent"].higher_is_better is False and METRICS["jacobian_mean"].higher_is_better is None
    assert metric_info("dice_12").label == "Dice label 12" and metric_info("dice_12").better == "higher"
    assert metric_info("something_new").label == "something_new"


def _browse(page: Path, fragment: str, profile: Path) -> tuple[_Page, np.ndarray]:
    """The page's DOM after its scripts ran, and a screenshot, from headless Chromium."""
    shot = profile.parent / f"{page.stem}.png"
    completed = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
         "--window-size=1300,900", "--virtual-time-budget=5000", f"--screenshot={shot}", "--dump-dom",
         page.as_uri() + fragment],
        capture_output=True, text=True, timeout=90, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return _Page(completed.stdout), np.asarray(Image.open(shot).convert("RGB")).astype(int)


def _assert_not_blank(screenshot: np.ndarray) -> None:
    assert (screenshot < 230).any(-1).mean() > 0.1  # text and pictures cover the page
    assert ((screenshot.max(-1) - screenshot.min(-1)) > 100).mean() > 0.005  # colour maps and overlays drawn


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found (Debian: apt-get install chromium); "
                    "the report's browser test needs it")
def test_reports_render_in_a_browser_and_the_slider_changes_the_slice(brain_slice, brain_volume, tmp_path):
    reports = {}
    for name, image in (("report2d", brain_slice), ("report3d", brain_volume)):
        result = _result(image, random_displacement(image, 3.0, 8.0, seed=1))
        reports[name] = write_html_report(result, tmp_path / f"{name}.html")

    written = _Page(reports["report2d"].read_text())
    shown, screenshot = _browse(reports["report2d"], "", tmp_path / "profile2d")
    assert shown.body["data-images-loaded"] == f"{len(written.images)}/{len(written.images)}"
    _assert_not_blank(screenshot)

    written = _Page(reports["report3d"].read_text())
    slices = json.loads(written.scripts["slices"])
    axial = slices["axial"]
    assert axial["indices"] == slice_positions(brain_volume.GetSize()[2])
    target = axial["indices"][1]
    shown, screenshot = _browse(reports["report3d"], f"#axial={target}", tmp_path / "profile3d")
    assert shown.body["data-images-loaded"] == f"{len(written.images)}/{len(written.images)}"
    assert shown.body["data-broken-images"] == ""
    _assert_not_blank(screenshot)
    assert shown.sections["plane-axial"]["data-slice"] == str(target)
    assert shown.sections["plane-coronal"]["data-slice"] == written.sections["plane-coronal"]["data-slice"]
    before = [img["src"] for img in written.images if img["section"] == "plane-axial" and "data-panel" in img]
    after = [img["src"] for img in shown.images if img["section"] == "plane-axial" and "data-panel" in img]
    assert after == axial["images"][1] and after[0] != before[0] and len(after) == len(before)
