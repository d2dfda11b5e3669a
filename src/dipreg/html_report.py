"""The per-pair HTML report ``report.html``: one self-contained page to look at a registration.

Every picture is embedded as a PNG data URI, so the file can be mailed or archived alone. It
shows fixed, moving and warped images, a checkerboard and an edge overlay of fixed vs warped,
the differences before and after, the deformation grid, the det J map (folded voxels marked),
the uncertainty map when the result has one, the loss curve per stage, the metrics with their
units and definitions, and the run's options, versions, device and timings. A 3D report shows
the three orthogonal planes through the centre with a slider per plane over pre-rendered
slices; ``report.html#axial=40`` opens it at the rendered slice nearest to axial slice 40.
"""

from __future__ import annotations

import base64
import datetime
import functools
import html
import io
import json
import math
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from PIL import Image  # noqa: E402
from skimage.feature import canny  # noqa: E402
from skimage.transform import resize  # noqa: E402

from dipreg.metric_catalogue import METRICS, metric_info  # noqa: E402
from dipreg.reports import (  # noqa: E402
    PLANES_3D,
    ResultLike,
    display_images,
    field_plane,
    grid_lines,
    jacobian_norm,
    plane_slice,
)
from dipreg.transforms import voxel_displacement_from_image  # noqa: E402

#: Slices pre-rendered per plane of a 3D report: the positions of its slider.
SLICES_PER_PLANE = 13
#: Largest side, in pixels, of the pictures of a 3D slice (larger slices are resampled down):
#: it keeps a 3D report at a few MB.
SLICE_PIXELS_3D = 128
#: Shown size of a panel's longer side, in CSS pixels.
PANEL_SIZE = 200
#: Colours marked on pictures: folded voxels (det J <= 0), grid lines, edges of fixed / warped / both.
FOLDED_RGB = (0.0, 0.9, 0.0)
GRID_RGB = (1.0, 0.9, 0.0)
FIXED_EDGE_RGB, WARPED_EDGE_RGB, BOTH_EDGES_RGB = (0.0, 1.0, 0.0), (1.0, 0.0, 1.0), (1.0, 1.0, 1.0)
#: Python distributions whose versions the report lists.
VERSIONED = ("numpy", "torch", "SimpleITK", "scikit-image", "matplotlib")


@dataclass
class _Volumes:
    """The arrays a report shows, on the fixed grid, with the colour scales shared by all slices."""

    fixed: np.ndarray
    moving: np.ndarray
    warped: np.ndarray
    det: np.ndarray
    voxel_field: np.ndarray
    uncertainty: np.ndarray | None
    spacing: tuple[float, ...]  # array axis order
    difference_norm: Normalize
    det_norm: Normalize
    uncertainty_norm: Normalize | None


@dataclass
class _View:
    """One plane of the volumes as 2D arrays (rows, columns in array order) and how it is shown.

    Slices of 3D volumes are resampled to at most :data:`SLICE_PIXELS_3D` pixels a side; ``field``
    (in-plane displacement, columns then rows) is in units of those pixels.
    """

    volumes: _Volumes
    fixed: np.ndarray
    moving: np.ndarray
    warped: np.ndarray
    det: np.ndarray
    folded: np.ndarray
    field: np.ndarray
    uncertainty: np.ndarray | None
    origin: str  # "upper": row 0 on top (2D); "lower": row 0 at the bottom (3D, superior/anterior up)
    width: int  # shown size, CSS pixels
    height: int


@functools.cache
def _palette(cmap: str, mark_colours: tuple[tuple[float, float, float], ...]) -> list[int]:
    """A PNG palette: ``cmap`` in ``256 - len(mark_colours)`` levels, then the mark colours."""
    colours = np.concatenate([plt.get_cmap(cmap)(np.linspace(0.0, 1.0, 256 - len(mark_colours)))[:, :3],
                              np.reshape(mark_colours, (-1, 3))])
    return np.round(colours * 255).astype(np.uint8).ravel().tolist()


def _png(values: np.ndarray, cmap: str = "gray",
         marks: tuple[tuple[np.ndarray, tuple[float, float, float]], ...] = ()) -> str:
    """Data URI of a palette PNG: ``values`` in [0, 1] through ``cmap``, then each (mask, colour) painted."""
    levels = 256 - len(marks)
    indices = np.round(np.clip(np.nan_to_num(values), 0.0, 1.0) * (levels - 1)).astype(np.uint8)
    for number, (mask, _) in enumerate(marks):
        indices[mask] = levels + number
    image = Image.fromarray(indices, mode="P")
    image.putpalette(_palette(cmap, tuple(colour for _, colour in marks)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _picture(view: _View, values: np.ndarray, cmap: str = "gray",
             marks: tuple[tuple[np.ndarray, tuple[float, float, float]], ...] = ()) -> str:
    """:func:`_png` of a plane's array, rows in display order."""
    if view.origin == "lower":
        values, marks = values[::-1], tuple((mask[::-1], colour) for mask, colour in marks)
    return _png(values, cmap, marks)


def _checkerboard(view: _View) -> str:
    rows, cols = np.indices(view.fixed.shape)
    tile = max(1, round(max(view.fixed.shape) / 8))
    return _picture(view, np.where((rows // tile + cols // tile) % 2 == 0, view.fixed, view.warped))


def _edges(image: np.ndarray) -> np.ndarray:
    """Canny edges at the strongest tenth of the gradients (none on a flat image)."""
    if np.ptp(image) == 0:
        return np.zeros(image.shape, bool)
    return canny(image, sigma=1.0, low_threshold=0.8, high_threshold=0.9, use_quantiles=True)


def _edge_overlay(view: _View) -> str:
    fixed_edges, warped_edges = _edges(view.fixed), _edges(view.warped)
    return _picture(view, 0.5 * view.fixed, marks=((fixed_edges & ~warped_edges, FIXED_EDGE_RGB),
                                                   (warped_edges & ~fixed_edges, WARPED_EDGE_RGB),
                                                   (fixed_edges & warped_edges, BOTH_EDGES_RGB)))


def _grid(view: _View) -> str:
    """The fixed image at the shown size with the moved grid lines drawn one pixel wide."""
    rows, cols = view.fixed.shape
    scale_rows, scale_cols = view.height / rows, view.width / cols
    background = view.fixed[(np.arange(view.height) / scale_rows).astype(int)][:, (np.arange(view.width) / scale_cols).astype(int)]
    lines = np.zeros(background.shape, bool)
    samples = np.linspace(0.0, 1.0, 2 * math.ceil(max(scale_rows, scale_cols)) + 1)[:, None]
    for line_cols, line_rows in grid_lines(view.field, lines=12):
        # points along each segment, dense enough to leave no gaps at the shown size
        y = ((line_rows[:-1] + samples * np.diff(line_rows) + 0.5) * scale_rows).ravel()
        x = ((line_cols[:-1] + samples * np.diff(line_cols) + 0.5) * scale_cols).ravel()
        inside = (y >= 0) & (y < view.height) & (x >= 0) & (x < view.width)
        lines[y[inside].astype(int), x[inside].astype(int)] = True
    return _picture(view, background, marks=((lines, GRID_RGB),))


def _jacobian(view: _View) -> str:
    return _picture(view, view.volumes.det_norm(view.det), "RdBu_r", marks=((view.folded, FOLDED_RGB),))


def _difference(before: bool) -> Callable[[_View], str]:
    def render(view: _View) -> str:
        other = view.moving if before else view.warped
        return _picture(view, view.volumes.difference_norm(np.abs(view.fixed - other)), "magma")
    return render


def _uncertainty(view: _View) -> str:
    return _picture(view, view.volumes.uncertainty_norm(view.uncertainty), "viridis")


@dataclass(frozen=True)
class _Panel:
    """A picture of each plane: its title, a one-line description, how it is drawn."""

    title: str
    description: str
    render: Callable[[_View], str]
    colour_bar: tuple[str, str, str] | None = None  # (volumes' norm attribute, colour map, label)
    needs_uncertainty: bool = False


#: The report's pictures, in the order shown.
PANELS = (
    _Panel("fixed", "the fixed image (scaled to [0, 1] by its 0.5-99.5 percentiles)", lambda v: _picture(v, v.fixed)),
    _Panel("moving", "the moving image on the fixed grid, before registration", lambda v: _picture(v, v.moving)),
    _Panel("warped", "the moving image warped onto the fixed image", lambda v: _picture(v, v.warped)),
    _Panel("checkerboard", "tiles of fixed and warped, alternating: edges should run on across tiles", _checkerboard),
    _Panel("edges", "edges of fixed (green) and warped (magenta) over the fixed image; white where they meet",
           _edge_overlay),
    _Panel("|fixed - moving|", "absolute difference before registration", _difference(before=True),
           ("difference_norm", "magma", "|difference|, images in [0, 1]")),
    _Panel("|fixed - warped|", "absolute difference after registration (same scale)", _difference(before=False),
           ("difference_norm", "magma", "|difference|, images in [0, 1]")),
    _Panel("deformation grid", "a regular grid of the fixed image moved by the displacement", _grid),
    _Panel("det J", "local volume change det(J_phi): red grows, blue shrinks; green voxels are folded (det J <= 0)",
           _jacobian, ("det_norm", "RdBu_r", "det J")),
    _Panel("uncertainty", "spread of the ensemble members' displacements", _uncertainty,
           ("uncertainty_norm", "viridis", "uncertainty (mm)"), needs_uncertainty=True),
)


def _volumes(result: "ResultLike") -> _Volumes:
    fixed, moving, warped = display_images(result)
    det = sitk.GetArrayFromImage(result.jacobian)
    uncertainty_image = getattr(result, "uncertainty", None)
    uncertainty = None if uncertainty_image is None else sitk.GetArrayFromImage(uncertainty_image).astype(np.float64)
    difference_limit = max(float(np.percentile(np.abs(fixed - moving), 99.5)), 0.05)
    uncertainty_norm = None if uncertainty is None else Normalize(0.0, max(float(np.nanpercentile(uncertainty, 99.5)), 1e-6))
    return _Volumes(fixed, moving, warped, det, voxel_displacement_from_image(result.displacement), uncertainty,
                    tuple(reversed(result.fixed.GetSpacing())), Normalize(0.0, difference_limit), jacobian_norm(det),
                    uncertainty_norm)


def _view(volumes: _Volumes, axis: int | None, index: int) -> _View:
    """The 2D image itself (``axis`` None) or slice ``index`` across array ``axis`` of a 3D volume."""
    if axis is None:
        take: Callable[[np.ndarray], np.ndarray] = lambda array: array  # noqa: E731
        take_folded: Callable[[np.ndarray], np.ndarray] = lambda det: det <= 0  # noqa: E731
        field, plane_axes, origin = volumes.voxel_field, (0, 1), "upper"
    else:
        plane_axes = tuple(a for a in range(3) if a != axis)
        native = tuple(volumes.fixed.shape[a] for a in plane_axes)
        factor = min(1.0, SLICE_PIXELS_3D / max(native))
        shape = tuple(max(1, round(n * factor)) for n in native)

        def shrink(plane: np.ndarray) -> np.ndarray:
            return resize(plane, shape, order=1, anti_aliasing=False, preserve_range=True) if shape != native else plane

        def take(array: np.ndarray) -> np.ndarray:
            return shrink(plane_slice(array, axis, index))

        def take_folded(det: np.ndarray) -> np.ndarray:  # a resampled pixel is folded if any folded voxel touches it
            return shrink((plane_slice(det, axis, index) <= 0).astype(np.float32)) > 0

        field = np.stack([shrink(component) for component in field_plane(volumes.voxel_field, axis, index)])
        field *= np.reshape([shape[1] / native[1], shape[0] / native[0]], (2, 1, 1))  # columns, rows
        origin = "lower"
    height_mm, width_mm = (volumes.fixed.shape[a] * volumes.spacing[a] for a in plane_axes)
    scale = PANEL_SIZE / max(height_mm, width_mm)
    return _View(volumes, take(volumes.fixed), take(volumes.moving), take(volumes.warped), take(volumes.det),
                 take_folded(volumes.det), field,
                 None if volumes.uncertainty is None else take(volumes.uncertainty), origin,
                 max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))


def slice_positions(size: int, count: int = SLICES_PER_PLANE) -> list[int]:
    """About ``count`` evenly spaced slice indices across ``size`` slices, the centre ``size // 2`` among them."""
    step = size / (count + 1)
    centre = size // 2
    return sorted({min(size - 1, max(0, round(centre + k * step))) for k in range(-(count // 2), count // 2 + 1)})


def _colour_bar(norm: Normalize, cmap: str, label: str) -> str:
    """HTML of a horizontal colour bar: the colour strip, its ends and middle (1 for det J) as text."""
    strip = _png(np.linspace(0.0, 1.0, 256)[None], cmap)
    ticks = "".join(f"<span>{value:.3g}</span>" for value in (norm.vmin, float(norm.inverse(0.5)), norm.vmax))
    return (f"<div class='bar'><img src='{strip}' alt='colour bar: {html.escape(label)}'>"
            f"<div class='ticks'>{ticks}</div>{html.escape(label)}</div>")


def _plane_section(name: str, views: list[_View], positions: list[int], size: int | None,
                   panels: list[_Panel]) -> tuple[str, dict[str, Any] | None]:
    """HTML of one plane (the centre slice shown) and its slider data (None in 2D)."""
    centre = positions.index(size // 2) if size else 0
    pictures = [[panel.render(view) for panel in panels] for view in views]
    view = views[centre]
    figures = []
    for number, (panel, uri) in enumerate(zip(panels, pictures[centre])):
        bar = _colour_bar(getattr(view.volumes, panel.colour_bar[0]), *panel.colour_bar[1:]) if panel.colour_bar else ""
        figures.append(
            f"<figure><figcaption>{html.escape(panel.title)}</figcaption>"
            f"<img data-panel='{number}' src='{uri}' width='{view.width}' height='{view.height}' "
            f"alt='{html.escape(panel.title)}' title='{html.escape(panel.description)}'>{bar}</figure>")
    slider = ""
    data = None
    if size:
        slider = (f"<p class='slider'><input type='range' min='0' max='{len(positions) - 1}' value='{centre}' "
                  f"aria-label='{name} slice'> <span class='slice-label'>slice {size // 2} of {size}</span></p>")
        data = {"size": size, "centre": centre, "indices": positions,
                "images": [None if position == centre else images for position, images in enumerate(pictures)]}
    heading = f"<h3>{html.escape(name)}</h3>" if name else ""
    return (f"<section class='plane' id='plane-{name or 'image'}' data-slice='{size // 2 if size else 0}'>"
            f"{heading}{slider}<div class='panels'>{''.join(figures)}</div></section>"), data


def _loss_stages(result: "ResultLike") -> list[dict[str, Any]]:
    stages = result.metrics.get("loss_stages")
    if stages:
        return [stage for stage in stages if stage.get("losses")]
    return [{"stage": "optimisation", "losses": result.loss_history}] if result.loss_history else []


def _loss_figure(stages: list[dict[str, Any]]) -> str:
    fig, axes = plt.subplots(1, len(stages), figsize=(3.4 * len(stages), 2.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        ax.plot(np.arange(1, len(stage["losses"]) + 1), stage["losses"], linewidth=1)
        ax.set_title(str(stage["stage"]), fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
    width = fig.get_figwidth()
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.2, top=0.88, wspace=0.35)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table of text cells (escaped)."""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Rows of the numeric metrics: catalogue entries in catalogue order, then the others (per-label Dice...)."""
    numeric = [key for key, value in metrics.items() if _is_number(value)]
    ordered = [key for key in METRICS if key in numeric] + [key for key in numeric if key not in METRICS]
    rows = []
    for key in ordered:
        info, value = metric_info(key), metrics[key]
        shown = "n/a" if isinstance(value, float) and math.isnan(value) else info.format(value)
        rows.append([info.label, shown, info.unit, info.better or "", info.definition])
    return rows


def _versions(metrics: dict[str, Any]) -> list[list[str]]:
    from dipreg import __version__

    rows = [["dipreg (registration)", str(metrics.get("dipreg_version", "unknown"))],
            ["dipreg (this report)", __version__], ["python", platform.python_version()],
            ["platform", platform.platform()]]
    for name in VERSIONED:
        try:
            rows.append([name, metadata.version(name)])
        except metadata.PackageNotFoundError:
            rows.append([name, "not installed"])
    return rows


def _image_rows(result: "ResultLike") -> list[list[str]]:
    def describe(name: str, image: sitk.Image) -> list[str]:
        return [name, " x ".join(map(str, image.GetSize())), " x ".join(f"{s:g}" for s in image.GetSpacing())]
    return [describe("fixed", result.fixed), describe("moving", result.moving)]


_SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById("slices").textContent);
  let checks = 0;
  function recordImages() {
    const token = ++checks;
    const images = Array.from(document.images);
    const settled = images.filter(img => !img.complete).map(img => new Promise(resolve => {
      img.addEventListener("load", resolve, {once: true});
      img.addEventListener("error", resolve, {once: true});
    }));
    Promise.all(settled).then(() => {
      if (token !== checks) return;
      const broken = images.filter(img => !(img.complete && img.naturalWidth > 0));
      document.body.dataset.imagesLoaded = (images.length - broken.length) + "/" + images.length;
      document.body.dataset.brokenImages = broken.map(img => img.alt).join(",");
    });
  }
  function show(plane, position) {
    const entry = data[plane], section = document.getElementById("plane-" + plane);
    section.querySelectorAll("img[data-panel]").forEach(img => { img.src = entry.images[position][img.dataset.panel]; });
    section.dataset.slice = entry.indices[position];
    section.querySelector(".slice-label").textContent = "slice " + entry.indices[position] + " of " + entry.size;
    recordImages();
  }
  for (const plane in data) {
    const entry = data[plane], section = document.getElementById("plane-" + plane);
    entry.images[entry.centre] = [];
    section.querySelectorAll("img[data-panel]").forEach(img => { entry.images[entry.centre][img.dataset.panel] = img.src; });
    section.querySelector("input").addEventListener("input", event => show(plane, Number(event.target.value)));
  }
  for (const part of location.hash.slice(1).split("&")) {  // e.g. #axial=40: the rendered slice nearest to 40
    const [plane, value] = part.split("=");
    if (!(plane in data)) continue;
    const distances = data[plane].indices.map(index => Math.abs(index - Number(value)));
    const slider = document.getElementById("plane-" + plane).querySelector("input");
    slider.value = distances.indexOf(Math.min(...distances));
    slider.dispatchEvent(new Event("input"));  // as if the slider had been moved there
  }
  recordImages();
})();
"""

_STYLE = """body{font-family:sans-serif;margin:1.2em;color:#222} h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.4em}
h3{font-size:1em;margin:0.6em 0 0.2em} table{border-collapse:collapse;margin:0.4em 0;font-size:0.9em}
td,th{border:1px solid #bbb;padding:2px 6px;text-align:left;vertical-align:top}
.panels{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;text-align:center;font-size:0.85em}
figure img{image-rendering:pixelated;background:#000} figure{max-width:min-content}
.bar{font-size:0.8em;margin-top:2px} .bar img{width:100%;height:10px;display:block}
.ticks{display:flex;justify-content:space-between}
.slider input{width:320px;vertical-align:middle} .summary{font-size:1.05em} dt{font-weight:bold}"""


def render_html_report(result: "ResultLike") -> str:
    """The report page of a registration result as one self-contained HTML string."""
    volumes = _volumes(result)
    panels = [panel for panel in PANELS if volumes.uncertainty is not None or not panel.needs_uncertainty]
    sections, slices = [], {}
    if volumes.fixed.ndim == 2:
        sections.append(_plane_section("", [_view(volumes, None, 0)], [0], None, panels)[0])
    else:
        for name, axis in PLANES_3D:
            size = volumes.fixed.shape[axis]
            positions = slice_positions(size)
            section, slices[name] = _plane_section(name, [_view(volumes, axis, index) for index in positions],
                                                   positions, size, panels)
            sections.append(section)
    descriptions = "".join(f"<dt>{html.escape(p.title)}</dt><dd>{html.escape(p.description)}</dd>" for p in panels)

    metrics = result.metrics
    stages = _loss_stages(result)
    stage_names = ", ".join(str(stage["stage"]) for stage in stages)
    losses = (f"<img src='{_loss_figure(stages)}' alt='loss curves: {html.escape(stage_names)}'>" if stages
              else f"<p>No loss history: method {html.escape(str(metrics.get('method', '')))} has none.</p>")
    summary = "   ".join(f"{METRICS[key].label} {METRICS[key].format(metrics[key])} {METRICS[key].unit}".strip()
                         for key in ("ssim", "folding_percent", "sdlogj", "jacobian_mean", "seconds")
                         if _is_number(metrics.get(key)))
    run_rows = [[key, str(value)] for key, value in metrics.items() if isinstance(value, str)]
    option_rows = [[key, str(value)] for key, value in (metrics.get("options") or {}).items()]
    options = html_table(["option", "value"], option_rows) if option_rows else "<p>No options (method has none).</p>"
    written = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    slice_note = ("<p>3D: the three planes through the centre; each slider steps through "
                  f"{SLICES_PER_PLANE} pre-rendered slices. Superior / anterior is up.</p>" if slices else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dipreg registration report</title>
<style>{_STYLE}</style></head><body>
<h1>dipreg registration report: {html.escape(str(metrics.get("method", "")))}</h1>
<p class="summary">{html.escape(summary)}</p>
<p>Written {html.escape(written)}. Hover over a picture for what it shows.</p>
<h2>Images</h2>
{slice_note}
{"".join(sections)}
<details><summary>What each picture shows</summary><dl>{descriptions}</dl></details>
<h2>Loss per stage</h2>
{losses}
<h2>Metrics</h2>
{html_table(["metric", "value", "unit", "better", "definition"], _metric_rows(metrics))}
<h2>Run</h2>
{html_table(["image", "size (voxels)", "spacing (mm)"], _image_rows(result))}
{html_table(["item", "value"], run_rows)}
<h2>Options</h2>
{options}
<h2>Versions</h2>
{html_table(["software", "version"], _versions(metrics))}
<script type="application/json" id="slices">{json.dumps(slices)}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_html_report(result: "ResultLike", path: str | os.PathLike) -> Path:
    """Write ``report.html`` (see :func:`render_html_report`) to ``path``; returns the path."""
    path = Path(path)
    path.write_text(render_html_report(result), encoding="utf-8")
    return path
