// neuronhunter browse: a static neuron browser. Routes live in the address's hash:
//   #            the run: layers, verdict counts, strongest neurons, search form
//   #L5          every neuron of layer 5 (sortable, filterable)
//   #L5.N12      one neuron: statistics, histogram, exemplars, its rows of the run's other tables
//   #search?...  a search over every neuron of the run (token, text, category, verdict, layer, flag; sort; pages)
// Data files (data/index.js, data/layer_05.js) call NH.load(kind, key, base64 gzip JSON); a layer's file is added
// as a <script> element the first time one of its pages opens (this works from file://, where fetch does not).
// Every text from the run is inserted with textContent, never as markup.
(function () {
  "use strict";
  const PER_PAGE = 50;
  const state = { index: null, layers: {}, waiting: {} };  // layers: by layer number, plus "contexts"

  // ---------------------------------------------------------------------------------------------- data
  async function inflate(b64) {
    const bin = Uint8Array.from(atob(b64), function (c) { return c.charCodeAt(0); });
    const stream = new Blob([bin]).stream().pipeThrough(new DecompressionStream("gzip"));
    return JSON.parse(await new Response(stream).text());
  }

  window.NH = {
    load: function (kind, key, b64) {
      inflate(b64).then(function (data) {
        if (kind === "index") { state.index = data; route(); return; }
        const name = kind === "contexts" ? "contexts" : key;
        state.layers[name] = data;
        (state.waiting[name] || []).forEach(function (fn) { fn(data); });
        delete state.waiting[name];
      }).catch(function (e) { fail("cannot read the data of this browser: " + e); });
    },
  };

  function dataFile(name, file) {
    if (state.layers[name]) return Promise.resolve(state.layers[name]);
    return new Promise(function (resolve, reject) {
      const first = !state.waiting[name];
      (state.waiting[name] = state.waiting[name] || []).push(resolve);
      if (!first) return;
      const s = document.createElement("script");
      s.src = "data/" + file;
      s.onerror = function () { delete state.waiting[name]; reject(new Error("this browser has no data file " + file)); };
      document.body.appendChild(s);
    });
  }
  // a layer's data and the exemplar contexts it refers to
  function layerData(layer) {
    return Promise.all([dataFile(layer, "layer_" + String(layer).padStart(2, "0") + ".js"),
      dataFile("contexts", "contexts.js")]).then(function (both) { return both[0]; });
  }
  function context(id) { return state.layers.contexts.contexts[id]; }

  // ---------------------------------------------------------------------------------------------- helpers
  function h(tag, attrs) {
    const node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        const v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "class") node.className = v;
        else if (k === "text") node.textContent = v;
        else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, String(v));
      });
    }
    for (let i = 2; i < arguments.length; i++) add(node, arguments[i]);
    return node;
  }
  function add(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { add(node, c); }); return; }
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }
  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return v.toLocaleString("en");
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e6) ? v.toExponential(2) : String(Number(v.toPrecision(4)));
  }
  function visible(t) { return String(t === null || t === undefined ? "" : t).replace(/\n/g, "⏎").replace(/\t/g, "→"); }
  function nid(layer, neuron) { return "L" + layer + ".N" + neuron; }
  function link(layer, neuron) { return h("a", { class: "neuron-link", href: "#" + nid(layer, neuron) }, nid(layer, neuron)); }
  function verdictBadge(v) { return v ? h("span", { class: "verdict v-" + v }, v) : null; }
  function text(i) { return i === null || i === undefined ? null : state.index.search.text[i]; }
  function splitList(s) { return s ? String(s).split(/[;+,| ]+/).filter(Boolean) : []; }
  function show(node) { const app = document.getElementById("app"); app.replaceChildren(header(), node); window.scrollTo(0, 0); }
  function fail(message) {
    const app = document.getElementById("app");
    app.replaceChildren(header(), h("main", null, h("p", { class: "error", id: "error-message" }, message)));
  }
  function params(query) {
    const out = {};
    new URLSearchParams(query || "").forEach(function (v, k) { if (v.trim()) out[k] = v; });
    return out;
  }
  function parseLayers(s) {
    const out = new Set();
    String(s).split(",").forEach(function (part) {
      const m = /^\s*(\d+)\s*(?:-\s*(\d+))?\s*$/.exec(part);
      if (!m) return;
      const lo = +m[1], hi = m[2] === undefined ? lo : +m[2];
      for (let i = lo; i <= hi && i - lo < 10000; i++) out.add(i);
    });
    return out;
  }

  // ---------------------------------------------------------------------------------------------- header
  function header() {
    const info = state.index ? state.index.info : { model: "", run: "" };
    const verdicts = state.index ? verdictNames() : [];
    const token = h("input", { name: "token", placeholder: "token, e.g. red", "aria-label": "token", id: "search-token" });
    const q = h("input", { name: "q", placeholder: "explanation text", "aria-label": "text" });
    const cat = h("input", { name: "category", placeholder: "category", "aria-label": "category", size: 9 });
    const layer = h("input", { name: "layer", placeholder: "layers", "aria-label": "layer", size: 6 });
    const verdict = h("select", { name: "verdict", "aria-label": "verdict" }, h("option", { value: "" }, "any verdict"),
      verdicts.map(function (v) { return h("option", { value: v }, v); }));
    const form = h("form", { class: "search", id: "search-form", onsubmit: function (ev) {
      ev.preventDefault();
      const p = new URLSearchParams();
      [token, q, cat, layer, verdict].forEach(function (f) { if (f.value.trim()) p.set(f.name, f.value); });
      location.hash = "#search?" + p.toString();
    } }, token, q, cat, layer, verdict, h("button", { type: "submit" }, "Search"));
    const jump = h("form", { class: "jump", onsubmit: function (ev) {
      ev.preventDefault();
      const m = /^\s*L?(\d+)\s*[.\s/]\s*N?(\d+)\s*$/i.exec(jumpTo.value);
      if (m) location.hash = "#" + nid(+m[1], +m[2]);
    } });
    const jumpTo = h("input", { placeholder: "L20.N882", "aria-label": "neuron", size: 9 });
    add(jump, [jumpTo, h("button", { type: "submit" }, "Go")]);
    return h("header", null,
      h("div", { class: "brand" }, h("a", { href: "#" }, "neuronhunter"), " · ", info.model, " · ", info.run),
      form, jump);
  }
  function verdictNames() {
    const counts = {};
    state.index.layers.forEach(function (l) { Object.keys(l.verdicts || {}).forEach(function (v) { counts[v] = (counts[v] || 0) + l.verdicts[v]; }); });
    return Object.keys(counts).sort(function (a, b) { return counts[b] - counts[a]; });
  }

  // ---------------------------------------------------------------------------------------------- index
  function indexView() {
    const idx = state.index, info = idx.info;
    const verdicts = verdictNames();
    const facts = h("dl", { class: "stats" });
    [["model", info.model + (info.family ? " (" + info.family + ")" : "")], ["run", info.run + " (" + info.kind + ")"],
      ["corpus", String(info.corpus || "–") + (info.split ? " · " + info.split + " documents" : "")],
      ["tokens", fmt(info.tokens)], ["window", fmt(info.context_length) + " tokens"]].forEach(function (kv) {
      add(facts, [h("dt", null, kv[0]), h("dd", null, kv[1])]);
    });
    const head = h("tr", null, ["layer", "neurons", "dead", "max", "active"].concat(verdicts).map(function (c) { return h("th", null, c); }));
    const rows = idx.layers.map(function (l) {
      return h("tr", null, h("td", null, h("a", { href: "#L" + l.layer, class: "layer-link" }, String(l.layer))),
        h("td", null, fmt(l.neurons)), h("td", null, fmt(l.dead)), h("td", null, fmt(l.max)), h("td", null, fmt(l.frac_active)),
        verdicts.map(function (v) {
          const n = (l.verdicts || {})[v] || 0;
          return h("td", null, n ? h("a", { href: "#search?" + new URLSearchParams({ layer: l.layer, verdict: v }) }, fmt(n)) : "0");
        }));
    });
    const strong = h("table", { id: "strongest" }, h("tr", null, ["neuron", "max", "mean", "active", "verdict", "category"].map(function (c) { return h("th", null, c); })),
      idx.strongest.map(function (s) {
        return h("tr", null, h("td", { class: "text" }, link(s.layer, s.neuron)), h("td", null, fmt(s.max)), h("td", null, fmt(s.mean)),
          h("td", null, fmt(s.frac_active)), h("td", { class: "text" }, verdictBadge(s.verdict)),
          h("td", { class: "text" }, s.claim_category || s.top_category || ""));
      }));
    show(h("main", null, h("h1", null, "Run " + info.run), facts,
      h("h2", null, "Layers"), h("table", { id: "layers" }, head, rows),
      h("h2", null, "Strongest neurons" + (verdicts.length ? " (positional and dead left out)" : "")), strong));
    document.title = "neuronhunter · " + info.model + " · " + info.run;
  }

  // ---------------------------------------------------------------------------------------------- search
  function matchesToken(ids, q) {
    const want = q.trim().toLowerCase();
    return ids.some(function (i) { return state.index.search.token[i].trim().toLowerCase() === want; });
  }
  function searchView(query) {
    const p = params(query), s = state.index.search;
    const layers = p.layer ? parseLayers(p.layer) : null;
    const sort = s.numbers.indexOf(p.sort) >= 0 ? p.sort : (s.numbers[0] || null);
    const asc = p.order === "asc";
    const catCols = ["claim_category", "claim_categories", "categories"].filter(function (c) { return s.texts.indexOf(c) >= 0; });
    if (!catCols.length && s.texts.indexOf("top_category") >= 0) catCols.push("top_category");
    const found = [];
    Object.keys(s.layers).forEach(function (key) {
      const L = s.layers[key], layer = +key;
      if (layers && !layers.has(layer)) return;
      L.neurons.forEach(function (n, i) {
        if (p.verdict && text(L.verdict ? L.verdict[i] : null) !== p.verdict) return;
        if (p.direction && text(L.direction ? L.direction[i] : null) !== p.direction) return;
        if (p.flag && splitList(text(L.flags ? L.flags[i] : null)).indexOf(p.flag) < 0) return;
        if (p.category && !catCols.some(function (c) { return splitList(text(L[c][i])).indexOf(p.category) >= 0; })) return;
        if (p.token && !matchesToken(L.tokens[i], p.token)) return;
        if (p.q) {
          const needle = p.q.trim().toLowerCase();
          const hay = [(L.explanation || [])[i]].concat(s.texts.map(function (c) { return text(L[c][i]); }));
          if (!hay.some(function (t) { return t && t.toLowerCase().indexOf(needle) >= 0; })) return;
        }
        found.push({ layer: layer, i: i, neuron: n, L: L });
      });
    });
    if (sort) {
      found.sort(function (a, b) {
        const x = a.L[sort][a.i], y = b.L[sort][b.i];
        if (x === y) return a.layer - b.layer || a.neuron - b.neuron;
        if (x === null) return 1;
        if (y === null) return -1;
        return asc ? x - y : y - x;
      });
    }
    const pages = Math.max(1, Math.ceil(found.length / PER_PAGE));
    const page = Math.min(Math.max(1, parseInt(p.page || "1", 10) || 1), pages);
    const shown = found.slice((page - 1) * PER_PAGE, page * PER_PAGE);
    function url(changes) { return "#search?" + new URLSearchParams(Object.assign({}, p, changes)).toString(); }
    const cols = ["neuron", "verdict", "category", "top token"].concat(s.numbers).concat(s.layers[Object.keys(s.layers)[0]].explanation ? ["explanation"] : []);
    const head = h("tr", null, cols.map(function (c) {
      if (s.numbers.indexOf(c) < 0) return h("th", { class: "text" }, c);
      const order = c === sort && !asc ? "asc" : "desc";
      return h("th", null, h("a", { href: url({ sort: c, order: order, page: 1 }) }, c + (c === sort ? (asc ? " ▲" : " ▼") : "")));
    }));
    const rows = shown.map(function (r) {
      const L = r.L, i = r.i;
      const cat = catCols.map(function (c) { return text(L[c][i]); }).filter(Boolean)[0] || "";
      const tok = L.tokens[i].length ? s.token[L.tokens[i][0]] : "";
      return h("tr", { class: "result" }, h("td", { class: "text" }, link(r.layer, r.neuron)),
        h("td", { class: "text" }, verdictBadge(text(L.verdict ? L.verdict[i] : null))), h("td", { class: "text" }, cat),
        h("td", { class: "text token" }, visible(tok)),
        s.numbers.map(function (c) { return h("td", null, fmt(L[c][i])); }),
        L.explanation ? h("td", { class: "text" }, L.explanation[i] || "") : null);
    });
    const nav = h("nav", { class: "pages" },
      page > 1 ? h("a", { href: url({ page: page - 1 }), id: "prev-page" }, "← previous") : null,
      page < pages ? h("a", { href: url({ page: page + 1 }), id: "next-page" }, "next →") : null);
    const what = Object.keys(p).filter(function (k) { return ["sort", "order", "page"].indexOf(k) < 0; })
      .map(function (k) { return k + " = " + p[k]; }).join(", ");
    show(h("main", null, h("h1", null, "Search"), h("p", { class: "muted" }, what || "every neuron"),
      h("p", { id: "result-count" }, fmt(found.length) + " neurons" + (found.length ? " · page " + page + " of " + pages : "")),
      h("table", { id: "results" }, head, rows), nav));
    document.title = "search · neuronhunter";
  }

  // ---------------------------------------------------------------------------------------------- layer
  function layerView(layer, data) {
    const info = state.index.info;
    const want = ["max", "mean", "frac_active", "verdict", "claim_category", "top_category"].filter(function (c) { return data.rows[c]; });
    const cols = ["neuron"].concat(want).concat(["top token"]);
    let sortCol = "neuron", asc = true;
    const filter = h("input", { placeholder: "filter: neuron, token, category, verdict", id: "filter", size: 36 });
    const body = h("tbody");
    function topToken(i) { const ex = data.examples[i]; return ex[2].length ? context(ex[2][0])[1] : ""; }
    function value(c, i) { return c === "neuron" ? data.neurons[i] : c === "top token" ? topToken(i) : data.rows[c][i]; }
    function draw() {
      const f = filter.value.trim().toLowerCase();
      let idx = data.neurons.map(function (_, i) { return i; });
      if (f) idx = idx.filter(function (i) { return cols.some(function (c) { return String(value(c, i) === null ? "" : value(c, i)).toLowerCase().indexOf(f) >= 0; }); });
      idx.sort(function (a, b) {
        const x = value(sortCol, a), y = value(sortCol, b);
        if (x === y) return a - b;
        if (x === null) return 1;
        if (y === null) return -1;
        return (x < y ? -1 : 1) * (asc ? 1 : -1);
      });
      body.replaceChildren.apply(body, idx.map(function (i) {
        return h("tr", { class: "row" }, cols.map(function (c) {
          const v = value(c, i);
          if (c === "neuron") return h("td", { class: "text" }, link(layer, v));
          if (c === "verdict") return h("td", { class: "text" }, verdictBadge(v));
          return h("td", { class: typeof v === "number" ? "" : "text" }, typeof v === "number" ? fmt(v) : visible(v || ""));
        }));
      }));
    }
    filter.addEventListener("input", draw);
    const head = h("tr", null, cols.map(function (c) {
      return h("th", { onclick: function () { if (sortCol === c) asc = !asc; else { sortCol = c; asc = c === "neuron"; } draw(); } }, c);
    }));
    draw();
    show(h("main", null, h("h1", null, "Layer " + layer + " ", h("span", { class: "muted" }, fmt(data.neurons.length) + " neurons · " + info.model)),
      h("p", null, h("a", { href: "#" }, "← the run")), filter, h("table", { id: "layer-table" }, h("thead", null, head), body)));
    document.title = "layer " + layer + " · neuronhunter";
  }

  // ---------------------------------------------------------------------------------------------- neuron
  function histogram(data, i) {
    const counts = (data.hist || [])[i];
    if (!counts || !counts.length) return h("p", { class: "muted" }, "No histogram in this run.");
    let edges = null, bars = counts, under = null, over = null;
    const info = state.index.info;
    if (data.hist_lo && data.hist_lo[i] !== null && data.hist_hi[i] > data.hist_lo[i]) {
      const lo = data.hist_lo[i], hi = data.hist_hi[i], n = counts.length - 2;
      edges = []; for (let k = 0; k <= n; k++) edges.push(lo + (hi - lo) * k / n);
    } else if (info.hist_edges && info.hist_edges.length > 1) {
      edges = info.hist_edges;
    }
    if (edges && counts.length === edges.length + 1) { under = counts[0]; over = counts[counts.length - 1]; bars = counts.slice(1, -1); }
    const W = 560, H = 150, left = 40, right = 8, top = 8, bottom = 28, flow = 10;
    const x0 = left + (under !== null ? flow + 4 : 0), x1 = W - right - (over !== null ? flow + 4 : 0);
    const peak = Math.max.apply(null, bars.concat([under || 0, over || 0, 1]));
    const scale = Math.log1p(peak), base = H - bottom, ph = H - top - bottom;
    function bh(c) { return c > 0 ? ph * Math.log1p(c) / scale : 0; }
    const root = svg("svg", { class: "hist", viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img" });
    const bw = (x1 - x0) / bars.length;
    bars.forEach(function (c, k) {
      const r = svg("rect", { class: "bar", x: (x0 + k * bw).toFixed(2), y: (base - bh(c)).toFixed(2), width: Math.max(bw - 0.6, 0.4).toFixed(2), height: bh(c).toFixed(2) });
      const t = svg("title"); t.textContent = (edges ? "[" + fmt(edges[k]) + ", " + fmt(edges[k + 1]) + "): " : "bin " + k + ": ") + fmt(c);
      r.appendChild(t); root.appendChild(r);
    });
    [[under, left, "below the range"], [over, W - right - flow, "above the range"]].forEach(function (f) {
      if (f[0] === null) return;
      const r = svg("rect", { class: "flow", x: f[1], y: (base - bh(f[0])).toFixed(2), width: flow, height: bh(f[0]).toFixed(2) });
      const t = svg("title"); t.textContent = f[2] + ": " + fmt(f[0]); r.appendChild(t); root.appendChild(r);
    });
    root.appendChild(svg("line", { class: "axis", x1: left, y1: base, x2: W - right, y2: base }));
    function label(x, y, s, anchor) { const t = svg("text", { class: "tick", x: x, y: y, "text-anchor": anchor }); t.textContent = s; root.appendChild(t); }
    label(left - 4, top + 8, fmt(peak), "end");
    if (edges) {
      const lo = edges[0], hi = edges[edges.length - 1];
      label(x0, base + 13, fmt(lo), "start"); label(x1, base + 13, fmt(hi), "end");
      if (lo < 0 && hi > 0) {
        const xz = x0 + (x1 - x0) * (-lo) / (hi - lo);
        root.appendChild(svg("line", { class: "zero", x1: xz.toFixed(2), y1: top, x2: xz.toFixed(2), y2: base }));
        label(xz.toFixed(2), base + 13, "0", "middle");
      }
    }
    label((x0 + x1) / 2, H - 3, "activation (count, log scale)", "middle");
    return root;
  }
  function groupTitle(g) {
    if (g[0] === "top") return "Top activations" + (g[1] === "-" ? " (−)" : "");
    if (g[0] === "bottom") return "Most negative activations";
    if (g[0] === "band") {
      const sign = g[1] === "-" ? "negative" : "positive";
      return "Quantile band " + g[2] + " (" + g[1] + ")" + (g[3] !== null && g[3] !== undefined ? ": from " + Math.round(100 * g[3]) + "% of the " + sign + " scale" : "");
    }
    return g.join(" ");
  }
  function tableCard(name, title, t, i) {
    const rows = t && t.rows[String(i)];
    if (!rows || !rows.length) return null;
    return h("section", { class: "card", id: "table-" + name }, h("h2", null, title),
      h("table", { class: "generic" }, h("tr", null, t.cols.map(function (c) { return h("th", { class: "text" }, c); })),
        rows.map(function (r) { return h("tr", null, r.map(function (v) { return h("td", { class: typeof v === "number" ? "" : "text" }, typeof v === "number" ? fmt(v) : visible(fmt(v))); })); })));
  }
  function logitsCard(t, i) {
    const mine = t && t.logits && t.logits.rows[String(i)];
    if (!mine) return null;
    function list(title, side) {
      if (!side) return null;
      return h("div", null, h("h3", null, title), h("table", { class: "logits" }, side[0].map(function (tok, k) {
        return h("tr", null, h("td", { class: "text token" }, visible(t.logits.tokens[tok])), h("td", null, fmt(side[1][k])));
      })));
    }
    return h("section", { class: "card", id: "table-logits" }, h("h2", null, "Direct logit attribution"),
      h("div", { class: "grid" }, list("promotes", mine.top), list("suppresses", mine.bottom)));
  }
  function conceptsCard(t, i) {
    const c = t && t.concepts, mine = c && c.rows[String(i)];
    if (!mine) return null;
    return h("section", { class: "card", id: "table-concepts" }, h("h2", null, "Responses per concept category"),
      h("table", { class: "generic" }, h("tr", null, h("th", { class: "text" }, "category"), c.cols.map(function (n) { return h("th", null, n); })),
        c.categories.map(function (cat, k) {
          return h("tr", null, h("td", { class: "text" }, cat), mine.map(function (col) { return h("td", null, fmt(col[k])); }));
        })));
  }
  function neuronView(layer, neuron, data) {
    const i = data.neurons.indexOf(neuron);
    if (i < 0) { fail("neuron " + neuron + " is not in layer " + layer + " of this run (its neurons: " + data.neurons[0] + ".." + data.neurons[data.neurons.length - 1] + ")"); return; }
    const row = {};
    Object.keys(data.rows).forEach(function (c) { row[c] = data.rows[c][i]; });
    const layers = state.index.info.layers, li = layers.indexOf(layer);
    const prev = i > 0 ? nid(layer, data.neurons[i - 1]) : li > 0 ? "L" + layers[li - 1] : null;
    const next = i + 1 < data.neurons.length ? nid(layer, data.neurons[i + 1]) : li + 1 < layers.length ? "L" + layers[li + 1] : null;
    const title = h("h1", { id: "neuron-title" }, nid(layer, neuron), " ", verdictBadge(row.verdict),
      row.direction ? h("span", { class: "muted" }, " (" + row.direction + ")") : null,
      row.claim_category ? h("span", { class: "badge claim" }, row.claim_category) : null,
      splitList(row.flags).map(function (f) { return h("span", { class: "badge flag" }, f); }));
    const stats = h("dl", { class: "stats", id: "stats" });
    Object.keys(row).forEach(function (c) { add(stats, [h("dt", null, c), h("dd", null, visible(fmt(row[c])))]); });
    const ex = data.examples[i], runs = ex[0], acts = ex[1], ctxs = ex[2];
    const sources = state.layers.contexts.sources;
    let at = 0;
    const exemplars = h("section", { class: "card", id: "exemplars" }, h("h2", null, "Exemplars"),
      runs.length ? null : h("p", { class: "muted" }, "No exemplars in this run."),
      runs.map(function (run) {
        const grp = data.groups[run[0]], rows = [];
        for (let k = 0; k < run[1]; k++, at++) {
          const c = context(ctxs[at]);
          rows.push(h("div", { class: "example", "data-kind": grp[0], title: sources[c[3]] + " @" + c[4] },
            h("span", { class: "act" }, fmt(acts[at])), h("span", { class: "left" }, visible(c[0])),
            h("mark", { class: "peak" }, visible(c[1])), h("span", { class: "right" }, visible(c[2]))));
        }
        return [h("h3", { class: "exemplar-group", "data-kind": grp[0] }, groupTitle(grp)), rows];
      }));
    const t = data.tables || {};
    show(h("main", null, title,
      h("p", { class: "muted" }, "layer ", h("a", { href: "#L" + layer }, String(layer)), " · ",
        prev ? h("a", { href: "#" + prev, id: "prev-neuron" }, "← previous") : null, " ",
        next ? h("a", { href: "#" + next, id: "next-neuron" }, "next →") : null),
      h("div", { class: "grid" },
        h("section", { class: "card", id: "histogram" }, h("h2", null, "Histogram"), histogram(data, i)),
        h("section", { class: "card" }, h("h2", null, "Statistics"), stats)),
      tableCard("explanations", "Explanations", t.explanations, i),
      exemplars,
      tableCard("claims", "Causal verification", t.claims, i),
      logitsCard(t.logits, i), conceptsCard(t.concepts, i)));
    document.title = nid(layer, neuron) + " · neuronhunter";
  }

  // ---------------------------------------------------------------------------------------------- routing
  function route() {
    if (!state.index) return;
    const hash = decodeURIComponent(location.hash.replace(/^#/, ""));
    let m;
    if ((m = /^search\??(.*)$/.exec(location.hash.replace(/^#/, "")))) { searchView(m[1]); return; }
    if ((m = /^L(\d+)(?:\.N(\d+))?$/.exec(hash))) {
      const layer = +m[1];
      if (state.index.info.layers.indexOf(layer) < 0) {
        fail("layer " + layer + " is not in this browser (its layers: " + state.index.info.layers.join(", ") + ")");
        return;
      }
      layerData(layer).then(function (data) {
        if (m[2] === undefined) layerView(layer, data); else neuronView(layer, +m[2], data);
      }).catch(function (e) { fail(e.message); });
      return;
    }
    if (hash) { fail("no page at #" + hash); return; }
    indexView();
  }
  window.addEventListener("hashchange", route);
})();
