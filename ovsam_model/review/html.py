"""HTML of the review folder: grid pages, one page per image, the review queue, the class chart.

Everything user-provided (file names, class names, extra fields) is escaped; every link is a
relative, percent-encoded path inside the folder, so the folder opens from disk and can be moved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from html import escape
from pathlib import PurePosixPath
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import quote

from .labels import Label, QueueItem, is_close
from .match import CROWD, MATCHED, MISSED, UNMATCHED


@dataclass
class ImageCard:
    """One image of the folder and where its files are: `page`, `overlay`, `thumb` are paths
    relative to the folder (from `ovsam_model.io.safe_paths`, so inside it and unique)."""

    position: int
    id: int
    file_name: str
    width: int
    height: int
    page: str
    overlay: str
    thumb: str
    labels: int = 0
    missed: int = 0
    thumb_size: tuple[int, int] = (0, 0)

    @property
    def root(self) -> str:
        """The folder's root as seen from this image's page."""
        return "../" * (len(PurePosixPath(self.page).parts) - 1)


def grid_file(page: int) -> str:
    return "index.html" if page == 1 else f"grid-{page:04d}.html"


def grid_data_file(page: int) -> str:
    return f"data/grid-{page:04d}.js"


def queue_file(page: int) -> str:
    return "queue.html" if page == 1 else f"queue-{page:04d}.html"


def url(path: str) -> str:
    return quote(path)


def js_assign(name: str, value: Any) -> str:
    """`window.NAME = <JSON>;` (a file that a page loads with <script src>: works from file://)."""
    return f"window.{name} = {json.dumps(value, separators=(',', ':'), allow_nan=False)};\n"


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


@dataclass
class Site:
    """What every page shares: category names, whether GT is shown, the page counts."""

    names: Mapping[int, str]
    gt: bool
    close_margin: float
    grid_pages: int = 1
    queue_pages: int = 1
    title: str = "ovsam review"

    def name(self, category_id: Optional[int]) -> str:
        if category_id is None:
            return ""
        return self.names.get(category_id, str(category_id))

    # --- shared pieces --------------------------------------------------------------------

    def head(self, title: str, root: str) -> str:
        return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{escape(title)}</title>"
                f'<link rel="stylesheet" href="{root}assets/review.css"></head>\n<body>\n')

    def nav(self, root: str) -> str:
        return (f'<nav><a class="keep-filter" href="{root}index.html">grid</a>'
                f'<a class="keep-filter" href="{root}queue.html">review queue</a>'
                f'<a href="{root}index.html#summary">class counts</a></nav>\n')

    def controls(self, what: str, total: int, sort: bool) -> str:
        parts = ['<div id="controls">',
                 '<label>class <select id="f-class"><option value="">all classes</option></select></label>',
                 '<label>score ≥ <input id="f-min" type="number" step="0.01" placeholder="min"></label>',
                 '<label>≤ <input id="f-max" type="number" step="0.01" placeholder="max"></label>']
        if sort:
            parts.append('<label>sort <select id="f-sort"><option value="order">image id</option>'
                         '<option value="score-desc">best score first</option>'
                         '<option value="score-asc">lowest score first</option></select></label>')
        if self.gt:
            parts.append('<label>status <select id="f-status"><option value="">any</option>'
                         + "".join(f'<option value="{s}">{s}</option>' for s in (MATCHED, UNMATCHED, CROWD, MISSED))
                         + "</select></label>")
        parts.append(f'<label><input id="f-close" type="checkbox"> close top-2 (margin &lt; {self.close_margin:g})</label>')
        parts.append(f'<span><span id="visible-count">{total}</span> of <span id="total-count">{total}</span> {what}'
                     + (' · <span id="label-count"></span> labels' if sort else "") + "</span>")
        parts.append("</div>\n")
        return "".join(parts)

    def scripts(self, root: str, page_data: Optional[str] = None) -> str:
        data = f'<script src="{root}{page_data}"></script>' if page_data else ""
        return (f'<script src="{root}data/meta.js"></script>{data}'
                f'<script src="{root}assets/review.js"></script>\n</body></html>\n')

    def pager(self, current: int, pages: int, file_of) -> str:
        if pages <= 1:
            return ""
        links = []
        for page in range(1, pages + 1):
            cls = "keep-filter current" if page == current else "keep-filter"
            links.append(f'<a class="{cls}" data-page="{page}" href="{url(file_of(page))}">{page}<span class="n"></span></a>')
        return '<div class="pager">pages: ' + "".join(links) + "</div>\n"

    def status_badge(self, status: Optional[str]) -> str:
        return f'<span class="badge {status}">{status}</span>' if status else ""

    # --- pages ----------------------------------------------------------------------------

    def grid_page(self, page: int, cards: Sequence[ImageCard], chart: str = "") -> str:
        figures = []
        for card in cards:
            counts = f"{card.labels} labels" + (f" · {card.missed} missed" if self.gt else "")
            w, h = card.thumb_size
            figures.append(
                f'<figure class="thumb" data-id="{card.id}" data-pos="{card.position}">'
                f'<a class="keep-filter" href="{url(card.page)}"><img src="{url(card.thumb)}" width="{w}" height="{h}" '
                f'alt="{escape(card.file_name)}"></a>'
                f'<figcaption><a class="keep-filter" href="{url(card.page)}">{escape(card.file_name)}</a><br>'
                f'id {card.id} · {counts} <span class="hits"></span></figcaption></figure>')
        title = f"{self.title}: images, page {page} of {self.grid_pages}"
        return (self.head(title, "") + "<header>" + self.nav("") + self.controls("images on this page", len(cards), True)
                + self.pager(page, self.grid_pages, grid_file) + "</header>\n<main>\n" + chart
                + '<div id="grid">\n' + "\n".join(figures) + "\n</div>\n</main>\n"
                + self.scripts("", grid_data_file(page)))

    def image_page(self, card: ImageCard, labels: Sequence[Label], missed: Sequence[tuple[int, Sequence[float]]],
                   grid_page: int, prev: Optional[ImageCard], next_: Optional[ImageCard]) -> str:
        root = card.root
        links = [f'<a class="keep-filter" href="{root}{url(grid_file(grid_page))}">grid page {grid_page}</a>']
        if prev is not None:
            links.append(f'<a class="keep-filter" href="{root}{url(prev.page)}">← previous</a>')
        if next_ is not None:
            links.append(f'<a class="keep-filter" href="{root}{url(next_.page)}">next →</a>')
        extra_keys = sorted({k for label in labels for k, _ in label.extra})
        head = ["#", "class", "score", "runner-up", "margin", *(["status"] if self.gt else []), "bbox (x, y, w, h)", *extra_keys]
        rows = []
        for label in labels:
            extra = dict(label.extra)
            close = ' <span class="badge close">close</span>' if is_close(label, self.close_margin) else ""
            runner = (f"{escape(self.name(label.runner_up))} {label.top2[1]:.3f}" if label.top2 else "")
            cells = [str(label.index), escape(self.name(label.category_id)), _fmt(label.score),
                     runner, _fmt(label.margin) + close, *([self.status_badge(label.status)] if self.gt else []),
                     ", ".join(f"{v:.1f}" for v in label.bbox),
                     *(escape(json.dumps(extra[k])) if k in extra else "" for k in extra_keys)]
            rows.append(self._row(label, cells, f'id="label-{label.index}"'))
        for category, bbox in missed:
            cells = ["", escape(self.name(category)), "", "", "", self.status_badge(MISSED),
                     ", ".join(f"{float(v):.1f}" for v in bbox), *([""] * len(extra_keys))]
            rows.append(f'<tr class="missed-row" data-cat="{category}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        legend = self._legend()
        return (self.head(f"{card.file_name} · {self.title}", root) + "<header>" + self.nav(root)
                + "<nav>" + "".join(links) + "</nav>" + self.controls("labels", len(labels) + len(missed), False)
                + "</header>\n<main>\n"
                + f"<h1>{escape(card.file_name)}</h1><p>image id {card.id} · {card.width}×{card.height} · "
                + f"{len(labels)} labels{f' · {len(missed)} missed GT' if self.gt else ''}"
                + "</p>\n" + legend
                + f'<div class="full"><img src="{root}{url(card.overlay)}" width="{card.width}" height="{card.height}" '
                + f'alt="{escape(card.file_name)}"></div>\n'
                + "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>\n" + "\n".join(rows)
                + "\n</table>\n</main>\n" + self.scripts(root))

    def _row(self, label: Label, cells: Sequence[str], attrs: str = "", kind: str = "label-row") -> str:
        margin = "" if label.margin is None else repr(label.margin)
        return (f'<tr class="{kind}" {attrs} data-index="{label.index}" data-cat="{label.category_id}" '
                f'data-score="{label.score!r}" data-margin="{margin}" data-status="{label.status or ""}">'
                + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")

    def _legend(self) -> str:
        if not self.gt:
            return "<p>Colours by class; each label shows the class and score.</p>\n"
        items = " ".join(f'<span class="badge {s}">{s}</span>' for s in (MATCHED, UNMATCHED, CROWD, MISSED))
        return f"<p>Colours by match with the ground truth: {items} (missed: GT outlines).</p>\n"

    def queue_page(self, page: int, items: Sequence[QueueItem], cards: Mapping[int, ImageCard], start: int,
                   low_score: float) -> str:
        rows = []
        for rank, item in enumerate(items, start=start + 1):
            label, card = item.label, cards[item.position]
            x, y, w, h = label.bbox
            box = (f'left:{100 * x / max(card.width, 1):.2f}%;top:{100 * y / max(card.height, 1):.2f}%;'
                   f'width:{100 * w / max(card.width, 1):.2f}%;height:{100 * h / max(card.height, 1):.2f}%')
            link = f"{url(card.page)}#label={label.index}"
            reasons = []
            if label.score <= low_score:
                reasons.append('<span class="badge low">low score</span>')
            if is_close(label, self.close_margin):
                reasons.append('<span class="badge close">close top-2</span>')
            runner = f"{escape(self.name(label.runner_up))} {label.top2[1]:.3f}" if label.top2 else ""
            cells = [str(rank), f'<a href="{link}"><span class="boxed"><img src="{url(card.thumb)}" alt="" '
                                f'loading="lazy"><span class="box" style="{box}"></span></span></a>',
                     f'<a href="{link}">{escape(card.file_name)}</a> #{label.index}', escape(self.name(label.category_id)),
                     _fmt(label.score), runner, _fmt(label.margin), " ".join(reasons),
                     *([self.status_badge(label.status)] if self.gt else [])]
            rows.append(self._row(label, cells, f'data-image="{card.id}"', kind="label-row queue-row"))
        head = ["rank", "", "image", "class", "score", "runner-up", "margin", "why", *(["status"] if self.gt else [])]
        intro = (f"<p>Labels to check first, lowest score first: the lowest-scoring labels and those whose top-2 "
                 f"probabilities are closer than {self.close_margin:g}.</p>\n")
        return (self.head(f"{self.title}: review queue, page {page} of {self.queue_pages}", "") + "<header>"
                + self.nav("") + self.controls("labels on this page", len(items), False)
                + self.pager(page, self.queue_pages, queue_file).replace("data-page", "data-queue-page")
                + "</header>\n<main>\n" + intro
                + "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>\n" + "\n".join(rows)
                + "\n</table>\n</main>\n" + self.scripts(""))

    def chart(self, counts: Mapping[int, Mapping[str, int]], summary: str) -> str:
        """Per-class counts as HTML bars: labels (split by match status with --gt), GT, missed."""
        order = sorted(counts, key=lambda c: (-counts[c].get("labels", 0), -counts[c].get("gt", 0), self.name(c)))
        top = max([counts[c].get("labels", 0) for c in order] + [counts[c].get("gt", 0) for c in order] + [1])
        head = ["class", "labels", *([MATCHED, UNMATCHED, CROWD, "GT", MISSED] if self.gt else []), ""]
        rows = []
        for c in order:
            n = counts[c]
            parts = [(s, n.get(s, 0)) for s in (MATCHED, UNMATCHED, CROWD)] if self.gt else [("all", n.get("labels", 0))]
            bar = "".join(f'<span class="{s}" style="width:{100 * v / top:.2f}%" title="{s} {v}"></span>' for s, v in parts if v)
            numbers = [n.get("labels", 0), *([n.get(MATCHED, 0), n.get(UNMATCHED, 0), n.get(CROWD, 0), n.get("gt", 0),
                                             n.get(MISSED, 0)] if self.gt else [])]
            rows.append(f'<tr class="class-row" data-cat="{c}"><td><a href="#class={c}">{escape(self.name(c))}</a></td>'
                        + "".join(f"<td>{v}</td>" for v in numbers) + f'<td><div class="bar">{bar}</div></td></tr>')
        return (f'<details id="summary" open><summary>{escape(summary)}</summary>\n'
                + '<div class="chart"><table><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr>\n"
                + "\n".join(rows) + "\n</table></div></details>\n")
