// neuronhunter neuron browser: renders the JSON in <script id="data"> (no network, no dependencies).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("data").textContent);
  const app = document.getElementById("app");
  const info = data.info;

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "cls") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children || []) node.append(c);
    return node;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || v === "") return "";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
    return v.toFixed(digits === undefined ? 3 : digits);
  }
  function layerFile(layer) { return "layer_" + String(layer).padStart(2, "0") + ".html"; }
  function verdictBadge(v) { return v ? el("span", {cls: "verdict v-" + v, text: v}) : ""; }

  function header(subtitle) {
    const h = el("header", {}, [el("h1", {text: "neuronhunter · " + info.model + (subtitle ? " · " + subtitle : "")})]);
    const parts = [info.family + " · " + fmt(info.tokens) + " tokens · corpus " + info.corpus +
                   " · context " + info.context_length + " · run " + info.run + " (" + info.kind + ")"];
    const line = el("div", {cls: "muted", text: parts.join("")});
    h.append(line);
    if (data.layer !== undefined) {
      const nav = el("div", {}, [el("a", {href: "index.html", text: "← all layers"})]);
      const i = info.layers.indexOf(data.layer);
      if (i > 0) nav.append(" · ", el("a", {href: layerFile(info.layers[i - 1]), text: "layer " + info.layers[i - 1]}));
      if (i >= 0 && i < info.layers.length - 1)
        nav.append(" · ", el("a", {href: layerFile(info.layers[i + 1]), text: "layer " + info.layers[i + 1]}));
      h.append(nav);
    }
    return h;
  }

  // a sortable table: columns [{key, label, text}] over rows; onClick(row, tr)
  function table(columns, rows, onClick) {
    const tbody = el("tbody");
    let sortKey = null, desc = true;
    const head = el("tr", {}, columns.map(c => {
      const th = el("th", {cls: c.text ? "text" : "", text: c.label});
      th.addEventListener("click", () => {
        desc = sortKey === c.key ? !desc : true; sortKey = c.key; render();
      });
      return th;
    }));
    let shown = rows;
    function render() {
      if (sortKey !== null) {
        shown = shown.slice().sort((a, b) => {
          const x = a[sortKey], y = b[sortKey];
          if (x === y) return 0;
          if (x === null || x === undefined) return 1;
          if (y === null || y === undefined) return -1;
          return (x < y ? -1 : 1) * (desc ? -1 : 1);
        });
      }
      tbody.replaceChildren(...shown.map(r => {
        const tr = el("tr", {cls: "row"}, columns.map(c => {
          const v = c.render ? c.render(r) : fmt(r[c.key]);
          return el("td", {cls: c.text ? "text" : ""}, [v]);
        }));
        if (onClick) tr.addEventListener("click", () => onClick(r, tr));
        r._tr = tr;
        return tr;
      }));
    }
    const t = el("table", {}, [el("thead", {}, [head]), tbody]);
    t.setRows = rs => { shown = rs; render(); };
    render();
    return t;
  }

  function histogram(counts, edges) {
    const w = 360, h = 90, n = counts.length;
    const max = Math.max(1, ...counts);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "hist"); svg.setAttribute("width", w); svg.setAttribute("height", h + 16);
    const bw = w / n;
    counts.forEach((c, i) => {
      const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const bh = c > 0 ? Math.max(1, (Math.log1p(c) / Math.log1p(max)) * h) : 0;
      r.setAttribute("x", i * bw); r.setAttribute("y", h - bh); r.setAttribute("width", Math.max(1, bw - 1));
      r.setAttribute("height", bh);
      const lo = i === 0 ? "-inf" : fmt(edges[i - 1], 2), hi = i === n - 1 ? "+inf" : fmt(edges[i], 2);
      if (i > 0 && i < n - 1 && edges[i - 1] <= 0 && edges[i] > 0) r.setAttribute("class", "zero");
      const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
      title.textContent = "[" + lo + ", " + hi + "): " + c;
      r.append(title); svg.append(r);
    });
    const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
    label.setAttribute("x", 0); label.setAttribute("y", h + 13); label.setAttribute("font-size", "11");
    label.textContent = "under " + fmt(edges[0], 1) + " … over " + fmt(edges[edges.length - 1], 1) + " (log count)";
    svg.append(label);
    return svg;
  }

  function detail(row) {
    const box = el("div");
    box.append(el("h2", {text: "L" + data.layer + ".N" + row.neuron + " "}, [verdictBadge(row.verdict)]));
    const dl = el("dl", {cls: "stats"});
    const names = {max: "max", mean: "mean", std: "std", min: "min", frac_active: "fraction active",
                   kurtosis: "excess kurtosis", first_mean: "mean at position 0", first_max: "max at position 0",
                   pos_mean_max: "largest per-position mean", top_category: "top category", crs: "CRS",
                   dprime: "d′ vs unlabelled", categories: "responsive categories"};
    for (const [k, label] of Object.entries(names)) {
      if (row[k] === undefined || row[k] === null || row[k] === "") continue;
      dl.append(el("dt", {text: label}), el("dd", {text: fmt(row[k])}));
    }
    box.append(dl);
    if (row.hist && row.hist.length) box.append(histogram(row.hist, row.edges || info.hist_edges));
    box.append(el("h3", {text: "Top activating examples (" + row.ex.length + ")"}));
    const flat = s => s.replace(/\r?\n/g, "⏎").replace(/\t/g, "⇥");  // one line per example
    for (const e of row.ex) {
      box.append(el("div", {cls: "example", title: e.src + " · doc " + e.doc + " · token " + e.pos}, [
        el("span", {cls: "act", text: fmt(e.a)}), el("span", {text: flat(e.l)}),
        el("span", {cls: "tok", text: flat(e.t)}), el("span", {text: flat(e.r)})]));
    }
    if (!row.ex.length) box.append(el("p", {cls: "muted", text: "No examples stored for this neuron."}));
    return box;
  }

  function layerPage() {
    document.title = "Layer " + data.layer + " · " + info.model;
    app.append(header("layer " + data.layer));
    const main = el("main");
    const rows = data.rows;
    const search = el("input", {type: "search", placeholder: "neuron number, top token or category"});
    const verdicts = [...new Set(rows.map(r => r.verdict).filter(v => v))].sort();
    const select = el("select", {}, [el("option", {value: "", text: "all verdicts"}),
                                     ...verdicts.map(v => el("option", {value: v, text: v}))]);
    const count = el("span", {cls: "muted"});
    main.append(el("div", {cls: "controls"}, [search, verdicts.length ? select : "", count]));
    const columns = [{key: "neuron", label: "neuron"}, {key: "max", label: "max"}, {key: "mean", label: "mean"},
                     {key: "frac_active", label: "active"}];
    if (rows.length && rows[0].verdict !== undefined) {
      columns.push({key: "verdict", label: "verdict", text: true, render: r => verdictBadge(r.verdict)});
      columns.push({key: "top_category", label: "top category", text: true});
    }
    columns.push({key: "top", label: "top token", text: true});
    const detailBox = el("div", {cls: "detail", text: "Click a neuron."});
    let selected = null;
    function show(r, tr) {
      if (selected) selected.classList.remove("selected");
      selected = tr; tr.classList.add("selected");
      detailBox.replaceChildren(detail(r));
      history.replaceState(null, "", "#n" + r.neuron);
    }
    const t = table(columns, rows, show);
    function filter() {
      const q = search.value.trim().toLowerCase(), v = select.value;
      const hit = rows.filter(r => (!v || r.verdict === v) && (!q || String(r.neuron) === q ||
        (r.top || "").toLowerCase().includes(q) || (r.top_category || "").toLowerCase().includes(q) ||
        (r.categories || "").toLowerCase().includes(q)));
      t.setRows(hit);
      count.textContent = hit.length + " of " + rows.length + " neurons";
    }
    search.addEventListener("input", filter); select.addEventListener("change", filter);
    filter();
    const list = el("div", {cls: "list"}, [t]);
    main.append(el("div", {cls: "layout"}, [list, detailBox]));
    app.append(main);
    const m = /^#n(\d+)$/.exec(location.hash);
    const first = m ? rows.find(r => r.neuron === Number(m[1])) : null;
    if (first && first._tr) {
      show(first, first._tr);
      if (first._tr.offsetTop !== undefined) list.scrollTop = first._tr.offsetTop - list.clientHeight / 2;
    }
  }

  function indexPage() {
    app.append(header(""));
    const main = el("main");
    main.append(el("h2", {text: "Layers"}));
    const verdictNames = [...new Set(data.layers.flatMap(l => Object.keys(l.verdicts || {})))].sort();
    const columns = [{key: "layer", label: "layer", render: l => el("a", {href: layerFile(l.layer), text: "layer " + l.layer})},
                     {key: "neurons", label: "neurons"}, {key: "dead", label: "never > threshold"},
                     {key: "max", label: "max"}, {key: "frac_active", label: "mean fraction active"}];
    for (const v of verdictNames) columns.push({key: "v_" + v, label: v});
    for (const l of data.layers) for (const v of verdictNames) l["v_" + v] = (l.verdicts || {})[v] || 0;
    main.append(table(columns, data.layers, l => { location.href = layerFile(l.layer); }));
    main.append(el("h2", {text: "Strongest neurons" + (verdictNames.length ? " (positional and dead left out)" : "")}));
    const scol = [{key: "layer", label: "neuron", render: r => el("a", {href: layerFile(r.layer) + "#n" + r.neuron,
                   text: "L" + r.layer + ".N" + r.neuron})},
                  {key: "max", label: "max"}, {key: "mean", label: "mean"}, {key: "frac_active", label: "active"}];
    if (data.strongest.length && data.strongest[0].verdict !== undefined) {
      scol.push({key: "verdict", label: "verdict", text: true, render: r => verdictBadge(r.verdict)});
      scol.push({key: "top_category", label: "top category", text: true});
    }
    main.append(table(scol, data.strongest, r => { location.href = layerFile(r.layer) + "#n" + r.neuron; }));
    app.append(main);
  }

  if (app.dataset.kind === "layer") layerPage(); else indexPage();
})();
