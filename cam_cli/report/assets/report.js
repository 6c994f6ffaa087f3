/* camx report: builds the page from the JSON block in index.html.
 * Every element is made with createElement/textContent/setAttribute: names from the
 * user's data are never parsed as markup. Pictures load lazily, one page of cards at a time. */
(function () {
  "use strict";

  var data = JSON.parse(document.getElementById("camx-data").textContent);
  var items = data.items;
  var methods = data.methods;
  var classes = data.classes;
  var lower = new Set(data.lowerIsBetter || []);
  var metricNames = data.lineMetrics || []; // per (input, method), from metrics.jsonl
  var lowerKeys = null; // lower-cased keys, made on the first search

  var state = {
    cls: "",
    shown: new Set(methods.map(function (_, i) { return i; })),
    failedOnly: false,
    query: "",
    sort: data.sort === "score" ? "score" : "key", // a similarity run opens by its score
    desc: data.sort === "score",
    page: 0,
    pageSize: 100,
  };
  var view = [];

  function el(tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (name) {
        var value = attrs[name];
        if (value === null || value === undefined || value === false) return;
        if (name === "text") node.textContent = String(value);
        else if (name === "className") node.className = value;
        else node.setAttribute(name, String(value));
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) continue;
      node.append(child); // strings become text nodes
    }
    return node;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    return value.toFixed(digits === undefined ? 3 : digits);
  }

  function list(values) {
    return values && values.length ? values.join(", ") : "–";
  }

  // ------------------------------------------------------------------ header

  function header() {
    var run = data.run;
    var h = el("header", { className: "run" });
    h.append(el("h1", null, "camx report: ", el("span", { className: "out", text: run.out })));
    var facts = [
      ["Model", list(run.model)],
      ["Weights", list(run.weights)],
      ["Methods", list(methods)],
      ["Target", list(run.target)],
      ["Input size", list(run.input_size)],
      ["Precision", list(run.precision)],
      ["Inputs", String(run.inputs), "images"],
      ["Maps", run.maps + " (" + methods.length + (methods.length === 1 ? " method)" : " methods)"),
        "maps made: one per (input, method) line"],
      ["Failed maps", String(run.failed), "(input, method) lines that failed"],
      ["Skipped maps", String(run.skipped), "(input, method) lines skipped"],
      ["Ran", run.when || "–"],
    ];
    var dl = el("dl", { className: "facts" });
    facts.forEach(function (f) {
      dl.append(el("div", { title: f[2] }, el("dt", { text: f[0] }), el("dd", { text: f[1] })));
    });
    h.append(dl);
    var layers = el("p", { className: "layers" }, "Layers: ");
    run.layers.forEach(function (pair, i) {
      if (i) layers.append("; ");
      layers.append(el("b", { text: pair[0] }), " ", el("code", { text: pair[1] || "–" }));
    });
    h.append(layers);
    if (data.metrics && data.metrics.rows.length) h.append(metricsTable(data.metrics));
    var mprt = document.getElementById("mprt"); // the MPRT section, written with the page: shown below the table
    if (mprt) h.append(mprt);
    return h;
  }

  function metricsTable(metrics) {
    var better = metrics.better || {};
    var titles = metrics.titles || {};
    var best = metrics.best || {};
    function lowerBetter(name) { return better[name] ? better[name] === "lower" : lower.has(name); }
    var ranked = metrics.rows.some(function (r) { return r.rank !== undefined; });
    var withIntervals = metrics.rows.some(function (r) { return r.low !== undefined; });
    var note = el("p", {
      className: "metrics-note",
      id: "metrics-note",
      text: "camx evaluate, per method: the mean of each metric" + (withIntervals ? " [95% bootstrap interval]" : "") +
        " over n lines, (n=…) where fewer lines have the value; ↓ lower is better, ↑ higher is better; " +
        (withIntervals
          ? "bold: the best, where its interval does not overlap the runner-up's" +
            (ranked ? "; methods share a rank where their intervals overlap on every metric." : ".")
          : "no intervals, so no value is marked best."),
    });
    var table = el("table", { className: "metrics", "aria-describedby": "metrics-note" });
    var head = el("tr");
    if (ranked) head.append(el("th", { scope: "col", text: "rank" }));
    head.append(el("th", { scope: "col", text: "method" }), el("th", { scope: "col", text: "n", title: "lines per method" }));
    metrics.names.forEach(function (name) {
      head.append(el("th", { scope: "col", title: name, text: (titles[name] || name) + (lowerBetter(name) ? " ↓" : " ↑") }));
    });
    table.append(el("thead", null, head));
    var body = el("tbody");
    metrics.rows.forEach(function (row) {
      var tr = el("tr");
      if (ranked) tr.append(el("td", { text: row.rank === undefined ? "–" : String(row.rank) }));
      tr.append(el("th", { scope: "row", text: row.method }), el("td", { text: fmt(row.n, 0) }));
      metrics.names.forEach(function (name) {
        var v = row.mean[name];
        var text = fmt(v);
        if (row.low && typeof row.low[name] === "number" && typeof row.high[name] === "number") {
          text += " [" + fmt(row.low[name]) + ", " + fmt(row.high[name]) + "]";
        }
        var count = row.count ? row.count[name] : undefined;
        var cell = el("td", { className: best[name] === row.method ? "best" : null, "data-metric": name }, text);
        if (typeof v === "number" && typeof count === "number" && count !== row.n) {
          cell.append(" ", el("span", { className: "count", text: "(n=" + count + ")" }));
        }
        tr.append(cell);
      });
      body.append(tr);
    });
    table.append(body);
    // the table scrolls inside its own box on a narrow screen; the page never does
    var scroller = el("div", { className: "table-scroll", tabindex: "0", role: "region", "aria-label": "metrics per method" }, table);
    return el("div", { className: "metrics-block" }, note, scroller);
  }

  // ---------------------------------------------------------------- controls

  var controls = {};

  function option(value, label) {
    return el("option", { value: value, text: label });
  }

  function toolbar() {
    var bar = el("form", { className: "controls", role: "search" });
    bar.addEventListener("submit", function (e) { e.preventDefault(); });

    var counts = new Array(classes.length).fill(0);
    items.forEach(function (it) {
      if (it.cs) it.cs.forEach(function (c) { counts[c]++; }); // a detection run's image: each of its classes
      else if (it.c !== undefined) counts[it.c]++;
    });
    controls.cls = el("select", { id: "f-class", name: "class" }, option("", "all classes (" + classes.length + ")"));
    classes.forEach(function (name, i) { controls.cls.append(option(String(i), name + " (" + counts[i] + ")")); });
    controls.cls.addEventListener("change", function () { state.cls = controls.cls.value; refresh(); });
    bar.append(el("label", null, "Class ", controls.cls));

    var box = el("fieldset", { className: "methods" }, el("legend", { text: "Methods shown" }));
    controls.methods = [];
    methods.forEach(function (name, i) {
      var check = el("input", { type: "checkbox", name: "method", value: name, checked: "checked", "data-method": String(i) });
      check.addEventListener("change", function () {
        if (check.checked) state.shown.add(i); else state.shown.delete(i);
        refresh();
      });
      controls.methods.push(check);
      box.append(el("label", null, check, " ", name));
    });
    bar.append(box);

    controls.failed = el("input", { type: "checkbox", id: "f-failed", name: "failed" });
    controls.failed.addEventListener("change", function () { state.failedOnly = controls.failed.checked; refresh(); });
    bar.append(el("label", null, controls.failed, " failed only"));

    controls.search = el("input", { type: "search", id: "f-search", name: "q", placeholder: "file name contains…", autocomplete: "off" });
    var timer = null;
    controls.search.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { state.query = controls.search.value.trim().toLowerCase(); refresh(); }, 120);
    });
    bar.append(el("label", null, "Search ", controls.search));

    controls.sort = el("select", { id: "f-sort", name: "sort" }, option("key", "file name"), option("score", "score"));
    methods.forEach(function (m, mi) {
      metricNames.forEach(function (name) {
        controls.sort.append(option("metric:" + mi + ":" + name, name + " (" + m + ")"));
      });
    });
    controls.sort.addEventListener("change", function () {
      state.sort = controls.sort.value;
      var name = state.sort.split(":")[2];
      // the natural direction: best first
      state.desc = state.sort === "score" || (name !== undefined && !lower.has(name));
      controls.dir.value = state.desc ? "desc" : "asc";
      refresh();
    });
    controls.dir = el("select", { id: "f-dir", name: "dir" }, option("asc", "ascending"), option("desc", "descending"));
    controls.dir.addEventListener("change", function () { state.desc = controls.dir.value === "desc"; refresh(); });
    controls.sort.value = state.sort;
    controls.dir.value = state.desc ? "desc" : "asc";
    bar.append(el("label", null, "Sort by ", controls.sort), el("label", null, controls.dir));

    controls.size = el("select", { id: "f-size", name: "size" });
    [50, 100, 200, 500].forEach(function (n) { controls.size.append(option(String(n), n + " per page")); });
    controls.size.value = String(state.pageSize);
    controls.size.addEventListener("change", function () { state.pageSize = +controls.size.value; state.page = 0; render(); });
    bar.append(el("label", null, controls.size));
    return bar;
  }

  function pager(where) {
    var nav = el("nav", { className: "pager", "aria-label": "pages " + where });
    var prev = el("button", { type: "button", className: "prev", text: "‹ previous" });
    var next = el("button", { type: "button", className: "next", text: "next ›" });
    var info = el("span", { className: "info" });
    prev.addEventListener("click", function () { go(state.page - 1); });
    next.addEventListener("click", function () { go(state.page + 1); });
    nav.append(prev, info, next);
    return { nav: nav, prev: prev, next: next, info: info };
  }

  function go(page) {
    var pages = Math.max(1, Math.ceil(view.length / state.pageSize));
    state.page = Math.min(Math.max(0, page), pages - 1);
    render();
    window.scrollTo(0, grid.offsetTop - 8);
  }

  // -------------------------------------------------------------- filtering

  function metricOf(item, mi, name) {
    for (var i = 0; i < item.m.length; i++) {
      var e = item.m[i];
      if (e.i === mi && e.x && typeof e.x[name] === "number") return e.x[name];
    }
    return null;
  }

  function refresh() {
    var began = performance.now();
    var cls = state.cls === "" ? -1 : +state.cls;
    var q = state.query;
    if (q && lowerKeys === null) lowerKeys = items.map(function (it) { return it.k.toLowerCase(); });
    var all = state.shown.size === methods.length;
    view = [];
    for (var i = 0; i < items.length; i++) {
      var it = items[i];
      if (cls >= 0 && it.c !== cls && !(it.cs && it.cs.indexOf(cls) >= 0)) continue;
      if (state.failedOnly && !it.f) continue;
      if (q && lowerKeys[i].indexOf(q) < 0) continue;
      if (!all && !it.m.some(function (e) { return state.shown.has(e.i); })) continue;
      view.push(i);
    }
    var value = null;
    if (state.sort === "score") {
      value = function (i) { return typeof items[i].s === "number" ? items[i].s : null; };
    } else if (state.sort.indexOf("metric:") === 0) {
      var parts = state.sort.split(":");
      var mi = +parts[1];
      var name = parts.slice(2).join(":");
      value = function (i) { return metricOf(items[i], mi, name); };
    }
    if (value !== null) {
      var keyed = view.map(function (i) { return [value(i), i]; });
      var sign = state.desc ? -1 : 1;
      keyed.sort(function (a, b) {
        if (a[0] === null || b[0] === null) {
          if (a[0] === b[0]) return a[1] - b[1];
          return a[0] === null ? 1 : -1; // no value: last either way
        }
        return a[0] === b[0] ? a[1] - b[1] : sign * (a[0] - b[0]);
      });
      view = keyed.map(function (p) { return p[1]; });
    } else if (state.desc) {
      view.reverse();
    }
    state.page = 0;
    render();
    window.camxRefreshMs = performance.now() - began; // filter + sort + first page, for bench/report_scale.py
    window.camxRefreshes = (window.camxRefreshes || 0) + 1;
  }

  // ----------------------------------------------------------------- cards

  function thumb(name, alt) {
    return el("img", { src: data.thumbs + name, alt: alt, loading: "lazy", decoding: "async" });
  }

  function methodFigure(item, e) {
    var name = methods[e.i];
    var fig = el("figure", { className: "fig method" + (e.st === "ok" ? "" : " error"), "data-method": name });
    if (e.st === "ok") {
      var picture = e.t ? thumb(e.t, name + " overlay of " + item.k) : el("span", { className: "nothumb", text: "no preview" });
      fig.append(e.h ? el("a", { href: e.h, target: "_blank", rel: "noopener noreferrer", title: "full-resolution " + name + " overlay" }, picture) : picture);
      var cap = el("figcaption", null, el("b", { text: name }));
      var cls = e.c !== null && e.c !== undefined ? e.c : "class " + fmt(e.ci, 0);
      cap.append(el("span", { className: "cls", text: cls + " " + fmt(e.s) }));
      if (e.b) cap.append(el("span", { className: "box", text: "box " + e.b.join(", ") }));
      if (e.flat) cap.append(el("span", { className: "note", text: "flat map" }));
      if (e.r) {
        cap.append(el("span", { className: "ranks", text: e.r.map(function (r) { return "#" + r[0] + " " + r[1] + " " + fmt(r[2]); }).join(" · ") }));
      }
      if (e.x) {
        var ms = metricNames.filter(function (n) { return typeof e.x[n] === "number"; }).map(function (n) { return n + " " + fmt(e.x[n]); });
        if (ms.length) cap.append(el("span", { className: "mx", text: ms.join(" · ") }));
      }
      fig.append(cap);
    } else {
      fig.append(el("span", { className: "nothumb", text: e.st === "error" ? "failed" : e.st }));
      fig.append(el("figcaption", null, el("b", { text: name }), el("span", { className: "reason", text: e.e || e.st })));
    }
    return fig;
  }

  function card(item) {
    var art = el("article", { className: "card" + (item.f ? " failed" : ""), "data-key": item.k });
    art.append(el("h3", { className: "key", title: item.k, text: item.k }));
    var pred = item.c !== undefined ? classes[item.c] : null;
    art.append(el("p", { className: "pred" }, pred === null ? "no prediction" : el("b", { text: pred }), item.s !== undefined ? " " + fmt(item.s) : null));
    var figs = el("div", { className: "figs" });
    if (item.i) figs.append(el("figure", { className: "fig input" }, thumb(item.i, item.k), el("figcaption", { text: "input" })));
    // a class filter on a detection run's image shows that class's detections (and the class-agnostic maps)
    var only = state.cls !== "" && item.cs ? classes[+state.cls] : null;
    item.m.forEach(function (e) {
      if (state.shown.has(e.i) && (only === null || !e.c || e.c === only)) figs.append(methodFigure(item, e));
    });
    art.append(figs);
    return art;
  }

  var grid;
  var pagers = [];
  var summary;

  function render() {
    var pages = Math.max(1, Math.ceil(view.length / state.pageSize));
    var start = state.page * state.pageSize;
    var stop = Math.min(view.length, start + state.pageSize);
    var fragment = document.createDocumentFragment();
    for (var n = start; n < stop; n++) fragment.append(card(items[view[n]]));
    grid.replaceChildren(fragment);
    var text = view.length ? "Showing " + (start + 1) + "–" + stop + " of " + view.length + " inputs" : "No inputs match";
    if (view.length !== items.length) text += " (of " + items.length + ")";
    summary.textContent = text;
    pagers.forEach(function (p) {
      p.info.textContent = "page " + (state.page + 1) + " of " + pages;
      p.prev.disabled = state.page === 0;
      p.next.disabled = state.page >= pages - 1;
    });
  }

  function failures() {
    var rows = [];
    items.forEach(function (it) {
      it.m.forEach(function (e) { if (e.st !== "ok") rows.push([it.k, methods[e.i], e.e || e.st]); });
    });
    if (!rows.length) return null;
    var limit = 1000;
    var section = el("section", { className: "failures", id: "failures" });
    section.append(el("h2", { text: "Failed (" + rows.length + (rows.length === 1 ? " line)" : " lines)") }));
    var table = el("table", null, el("thead", null, el("tr", null, el("th", { text: "input" }), el("th", { text: "method" }), el("th", { text: "reason" }))));
    var body = el("tbody");
    rows.slice(0, limit).forEach(function (r) {
      body.append(el("tr", null, el("td", { className: "key", text: r[0] }), el("td", { text: r[1] }), el("td", { text: r[2] })));
    });
    table.append(body);
    section.append(table);
    if (rows.length > limit) section.append(el("p", { text: "…and " + (rows.length - limit) + " more: tick “failed only” to page through them all." }));
    return section;
  }

  function start() {
    var app = document.getElementById("app");
    var top = pager("top");
    var bottom = pager("bottom");
    pagers = [top, bottom];
    summary = el("p", { className: "summary", role: "status" });
    grid = el("div", { className: "grid", id: "grid" });
    // a card wide enough for the input and every method side by side (CSSOM, allowed by the page's CSP)
    var figures = methods.length + 1;
    grid.style.setProperty("--card", Math.min(figures * 160 + (figures - 1) * 8 + 22, 1200) + "px");
    app.replaceChildren(header(), toolbar(), summary, top.nav, grid, bottom.nav);
    var fail = failures();
    if (fail) app.append(fail);
    app.append(el("footer", { text: "camx " + data.run.version + " · thumbnails link to the full-resolution overlays in the run folder" }));
    refresh();
    document.documentElement.setAttribute("data-ready", "1");
    window.camxReadyAt = performance.now();
  }

  start();
})();
