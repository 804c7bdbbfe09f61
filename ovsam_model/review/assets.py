"""The review folder's stylesheet and script (plain CSS and JavaScript, no CDN, no framework).

The script reads the filter from the URL hash, so a filtered view is a link and the same hash
works on every page (grid, image, queue):

    #class=person&min=0.2&max=0.8&sort=score-asc&status=unmatched&close=1

`class`: a category id or name; `min`/`max`: the score range (inclusive); `sort` (grid):
`order` (image id), `score-desc` (best matching label first), `score-asc` (worst first);
`status` (with --gt): `matched`, `unmatched`, `crowd` or `missed`; `close=1`: only labels whose
top-2 probabilities are closer than the folder's close margin. The controls rewrite the hash;
the links between pages carry it along.

Data: `window.OVSAM_META` (data/meta.js: categories, grid pages and their per-class counts) and,
on a grid page, `window.OVSAM_PAGE` (data/grid-NNNN.js: per image id, its labels as
[category_id, score, margin, status] and its missed GT classes). Label rows of the image and
queue pages carry the same values as data-* attributes.
"""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header, main, footer { padding: 8px 16px; }
header { background: #fff; border-bottom: 1px solid #ddd; position: sticky; top: 0; z-index: 2; }
nav a { margin-right: 10px; }
#controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-top: 6px; }
#controls input[type=number] { width: 5em; }
.pager a, .pager span { margin-right: 6px; }
.pager .current { font-weight: bold; }
.pager .empty { color: #aaa; }
#grid { display: flex; flex-wrap: wrap; gap: 10px; }
.thumb { margin: 0; width: 240px; background: #fff; border: 1px solid #ddd; padding: 4px; }
.thumb img { max-width: 232px; max-height: 232px; display: block; margin: auto; }
.thumb figcaption { font-size: 12px; overflow-wrap: anywhere; }
.full img { max-width: 100%; height: auto; }
table { border-collapse: collapse; background: #fff; }
td, th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
.chart { max-height: 240px; overflow: auto; display: inline-block; margin-bottom: 8px; }
.bar { display: flex; height: 12px; background: #eee; min-width: 240px; }
.bar span { display: block; height: 100%; }
.bar .all { background: #4a7bd0; } .bar .matched { background: rgb(30,180,60); }
.bar .unmatched { background: rgb(230,40,40); } .bar .crowd { background: rgb(150,150,150); }
.badge { display: inline-block; padding: 0 4px; border-radius: 3px; font-size: 12px; color: #fff; }
.badge.close { background: #8a4fd0; } .badge.low { background: #d07a1a; }
.badge.matched { background: rgb(30,180,60); } .badge.unmatched { background: rgb(230,40,40); }
.badge.crowd { background: rgb(150,150,150); } .badge.missed { background: rgb(255,170,0); color: #222; }
.boxed { position: relative; display: inline-block; }
.boxed img { display: block; max-width: 200px; max-height: 200px; }
.boxed .box { position: absolute; border: 2px solid #ff0; box-shadow: 0 0 0 1px #000; }
tr.focus td { background: #fff3b0; }
[hidden] { display: none !important; }
"""

JS = r"""
(function () {
  "use strict";
  var META = window.OVSAM_META || {categories: {}, pages: [], gt: false, closeMargin: 0.1};
  var PAGE = window.OVSAM_PAGE || null;
  var names = META.categories || {};

  function classId(value) {
    if (value === "" || value === null || value === undefined) return null;
    if (Object.prototype.hasOwnProperty.call(names, value)) return Number(value);
    for (var id in names) { if (names[id] === value) return Number(id); }
    return -1;  // an unknown class matches nothing
  }
  function number(value, fallback) {
    var n = parseFloat(value);
    return isFinite(n) ? n : fallback;
  }
  function decode(text) {  // a hand-edited link may hold a lone "%": keep it as typed, not a URIError
    try { return decodeURIComponent(text); } catch (e) { return text; }
  }
  function readFilter() {
    var f = {cls: null, min: -Infinity, max: Infinity, sort: "order", status: "", close: false, raw: {}};
    location.hash.replace(/^#/, "").split("&").forEach(function (pair) {
      if (!pair) return;
      var i = pair.indexOf("=");
      var key = decode(i < 0 ? pair : pair.slice(0, i));
      var value = i < 0 ? "" : decode(pair.slice(i + 1).replace(/\+/g, " "));
      f.raw[key] = value;
      if (key === "class") f.cls = classId(value);
      else if (key === "min") f.min = number(value, -Infinity);
      else if (key === "max") f.max = number(value, Infinity);
      else if (key === "sort") f.sort = value;
      else if (key === "status") f.status = value;
      else if (key === "close") f.close = value === "1" || value === "true";
      else if (key === "label") f.label = value;
    });
    return f;
  }
  function active(f) {
    return f.cls !== null || f.min > -Infinity || f.max < Infinity || f.status !== "" || f.close;
  }
  // a label: [category_id, score, margin, status]
  function passes(label, f) {
    if (f.cls !== null && label[0] !== f.cls) return false;
    if (label[1] < f.min || label[1] > f.max) return false;
    if (f.status === "missed") return false;
    if (f.status && label[3] !== f.status) return false;
    if (f.close && !(label[2] !== null && label[2] < META.closeMargin)) return false;
    return true;
  }
  function missedPasses(cat, f) {
    return f.status === "missed" && (f.cls === null || cat === f.cls);
  }
  function rowLabel(el) {
    var margin = el.getAttribute("data-margin");
    return [Number(el.getAttribute("data-cat")), Number(el.getAttribute("data-score")),
            margin === null || margin === "" ? null : Number(margin), el.getAttribute("data-status") || null];
  }

  function applyGrid(f) {
    var grid = document.getElementById("grid");
    if (!grid || !PAGE) return;
    var figures = Array.prototype.slice.call(grid.querySelectorAll(".thumb"));
    var shown = 0, labels = 0;
    figures.forEach(function (fig) {
      var data = PAGE[fig.getAttribute("data-id")] || {l: [], m: []};
      var hits = data.l.filter(function (l) { return passes(l, f); });
      var missed = (data.m || []).filter(function (c) { return missedPasses(c, f); });
      var visible = !active(f) || hits.length > 0 || missed.length > 0;
      fig.hidden = !visible;
      var scores = hits.map(function (l) { return l[1]; });
      fig._best = scores.length ? Math.max.apply(null, scores) : -Infinity;
      fig._worst = scores.length ? Math.min.apply(null, scores) : Infinity;
      var note = fig.querySelector(".hits");
      if (note) note.textContent = active(f) ? (hits.length + missed.length) + " matching" : "";
      if (visible) { shown += 1; labels += hits.length + missed.length; }
    });
    var order = function (a, b) { return Number(a.getAttribute("data-pos")) - Number(b.getAttribute("data-pos")); };
    var key = order;
    if (f.sort === "score-desc") key = function (a, b) { return (b._best - a._best) || order(a, b); };
    if (f.sort === "score-asc") key = function (a, b) { return (a._worst - b._worst) || order(a, b); };
    figures.sort(key).forEach(function (fig) { grid.appendChild(fig); });
    setText("visible-count", shown);
    setText("label-count", active(f) ? labels : figures.reduce(function (n, fig) {
      return n + (PAGE[fig.getAttribute("data-id")] || {l: []}).l.length; }, 0));
  }
  function applyRows(f) {
    var rows = document.querySelectorAll("tr.label-row, tr.missed-row");
    if (!rows.length) return;
    var shown = 0;
    Array.prototype.forEach.call(rows, function (row) {
      var ok = row.classList.contains("missed-row")
        ? !active(f) || missedPasses(Number(row.getAttribute("data-cat")), f)
        : !active(f) || passes(rowLabel(row), f);
      row.hidden = !ok;
      if (ok) shown += 1;
      var focused = f.label !== undefined && row.classList.contains("label-row") && !row.classList.contains("queue-row")
        && row.getAttribute("data-index") === f.label;
      row.classList.toggle("focus", focused);
      if (focused && row.scrollIntoView) row.scrollIntoView({block: "center"});
    });
    if (!document.getElementById("grid")) setText("visible-count", shown);
  }
  function applyPager(f) {
    var pager = document.querySelectorAll(".pager a[data-page]");
    Array.prototype.forEach.call(pager, function (a) {
      var info = META.pages[Number(a.getAttribute("data-page")) - 1];
      var count = !info ? null : f.cls === null ? info.images : (info.classes[String(f.cls)] || 0);
      var badge = a.querySelector(".n");
      if (badge) badge.textContent = f.cls === null ? "" : " (" + count + ")";
      a.classList.toggle("empty", f.cls !== null && count === 0);
    });
  }
  function carryHash() {
    Array.prototype.forEach.call(document.querySelectorAll("a.keep-filter"), function (a) {
      var base = a.getAttribute("href").split("#")[0];
      a.setAttribute("href", base + location.hash);
    });
  }
  function setText(id, value) {
    var el = document.getElementById(id);
    if (el) el.textContent = String(value);
  }
  function syncControls(f) {
    var set = function (id, value) { var el = document.getElementById(id); if (el) el.value = value; };
    set("f-class", f.cls === null ? "" : String(f.cls));
    set("f-min", f.min === -Infinity ? "" : f.min);
    set("f-max", f.max === Infinity ? "" : f.max);
    set("f-sort", f.sort);
    set("f-status", f.status);
    var close = document.getElementById("f-close");
    if (close) close.checked = f.close;
  }
  function writeHash() {
    var parts = [];
    var get = function (id) { var el = document.getElementById(id); return el ? el.value : ""; };
    if (get("f-class") !== "") parts.push("class=" + encodeURIComponent(get("f-class")));
    if (get("f-min") !== "") parts.push("min=" + encodeURIComponent(get("f-min")));
    if (get("f-max") !== "") parts.push("max=" + encodeURIComponent(get("f-max")));
    if (get("f-sort") && get("f-sort") !== "order") parts.push("sort=" + get("f-sort"));
    if (get("f-status") !== "") parts.push("status=" + get("f-status"));
    var close = document.getElementById("f-close");
    if (close && close.checked) parts.push("close=1");
    location.hash = parts.join("&");
  }
  function fillClasses() {
    var select = document.getElementById("f-class");
    if (!select) return;
    var ids = Object.keys(names).sort(function (a, b) { return names[a] < names[b] ? -1 : names[a] > names[b] ? 1 : 0; });
    ids.forEach(function (id) {
      var option = document.createElement("option");
      option.value = id;
      option.textContent = names[id];
      select.appendChild(option);
    });
  }
  function apply() {
    var f = readFilter();
    syncControls(f);
    applyGrid(f);
    applyRows(f);
    applyPager(f);
    carryHash();
  }
  fillClasses();
  ["f-class", "f-min", "f-max", "f-sort", "f-status", "f-close"].forEach(function (id) {
    var el = document.getElementById(id);
    if (el) el.addEventListener("change", writeHash);
  });
  window.addEventListener("hashchange", apply);
  apply();
  document.documentElement.setAttribute("data-ready", "1");
})();
"""
