// neuronhunter serve: the live panel of a neuron page (activations on typed text, compare, steer).
// Every piece of text from the server or the user is inserted with textContent, never as markup.
(function () {
  "use strict";

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toPrecision(4).replace(/\.?0+$/, "");
  }

  function pct(p) { return (100 * p >= 0.01 ? (100 * p).toFixed(2) : (100 * p).toPrecision(2)) + "%"; }

  function visible(t) { return String(t).replace(/\n/g, "⏎").replace(/\t/g, "→"); }

  async function post(url, body) {
    const res = await fetch(url, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) throw new Error((data && data.error) || (res.status + " " + res.statusText));
    return data;
  }

  // One text's activations: the tokens highlighted, then one bar per token (up: positive, down: negative).
  function activationBlock(data, scale, label) {
    const block = el("div", "live-block");
    block.dataset.tokens = String(data.tokens.length);
    if (label) block.appendChild(el("h4", "", label));
    block.appendChild(el("p", "muted live-summary",
      data.tokens.length + " tokens · max " + fmt(data.max) + " · min " + fmt(data.min) +
      " · " + data.elapsed_ms + " ms"));
    const text = el("div", "live-text");
    const bars = el("div", "bars");
    data.tokens.forEach(function (tok, i) {
      const a = data.activations[i];
      const v = a === null ? 0 : a;
      const alpha = Math.min(1, Math.abs(v) / scale);
      const span = el("span", "tok", tok);
      span.style.backgroundColor = v >= 0 ? "rgba(214, 84, 38, " + alpha.toFixed(3) + ")"
                                          : "rgba(40, 98, 214, " + alpha.toFixed(3) + ")";
      const cats = data.categories && data.categories[i] && data.categories[i].length
        ? " [" + data.categories[i].join(", ") + "]" : "";
      span.title = JSON.stringify(tok) + ": " + fmt(a) + cats;
      span.dataset.activation = String(a);
      text.appendChild(span);

      const col = el("div", "bar-col");
      col.title = span.title;
      const up = el("div", "up"), down = el("div", "down");
      const bar = el("div", "bar " + (v >= 0 ? "pos" : "neg"));
      bar.style.height = (100 * Math.min(1, Math.abs(v) / scale)).toFixed(1) + "%";
      (v >= 0 ? up : down).appendChild(bar);
      col.appendChild(up);
      col.appendChild(down);
      col.appendChild(el("div", "lab", visible(tok)));
      bars.appendChild(col);
    });
    block.appendChild(text);
    const wrap = el("div", "bars-wrap");
    wrap.appendChild(bars);
    block.appendChild(wrap);
    return block;
  }

  function steerTable(title, rows, key) {
    const box = el("div", "steer-list");
    box.appendChild(el("h4", "", title));
    const table = el("table", "steer");
    const head = el("tr");
    ["token", "before", "after"].forEach(function (h) { head.appendChild(el("th", "", h)); });
    table.appendChild(head);
    rows.forEach(function (r) {
      const tr = el("tr");
      tr.appendChild(el("td", "token", visible(r.token)));
      tr.appendChild(el("td", "", pct(r.base)));
      const d = r.steered - r.base;
      tr.appendChild(el("td", d >= 0 ? "up-diff" : "down-diff", pct(r.steered)));
      table.appendChild(tr);
    });
    box.appendChild(table);
    box.dataset.key = key;
    return box;
  }

  function setup(root) {
    const run = root.dataset.run;
    const layer = parseInt(root.dataset.layer, 10);
    const neuron = parseInt(root.dataset.neuron, 10);
    const scale0 = Math.abs(parseFloat(root.dataset.scale)) || 1;
    const form = document.getElementById("live-form");
    const status = document.getElementById("live-status");
    const result = document.getElementById("live-result");
    const steerForm = document.getElementById("steer-form");
    const steerStatus = document.getElementById("steer-status");
    const steerResult = document.getElementById("steer-result");

    form.addEventListener("submit", async function (ev) {
      ev.preventDefault();
      const a = document.getElementById("live-text").value;
      const b = document.getElementById("live-text-b").value;
      const texts = b.trim() ? [a, b] : [a];
      status.textContent = "computing…";
      status.className = "muted";
      try {
        const out = [];
        for (const t of texts) {
          out.push(await post("/api/activations", { run: run, layer: layer, neuron: neuron, text: t }));
        }
        let peak = scale0;
        out.forEach(function (d) {
          d.activations.forEach(function (v) { if (v !== null) peak = Math.max(peak, Math.abs(v)); });
        });
        result.replaceChildren();
        out.forEach(function (d, i) {
          result.appendChild(activationBlock(d, peak, out.length > 1 ? (i === 0 ? "first text" : "second text") : ""));
        });
        status.textContent = "";
      } catch (e) {
        status.textContent = e.message;
        status.className = "error";
      }
    });

    steerForm.addEventListener("submit", async function (ev) {
      ev.preventDefault();
      const text = document.getElementById("live-text").value;
      const scale = parseFloat(document.getElementById("steer-scale").value);
      steerStatus.textContent = "computing…";
      steerStatus.className = "muted";
      try {
        const d = await post("/api/steer", { run: run, layer: layer, neuron: neuron, text: text, scale: scale });
        steerResult.replaceChildren();
        steerResult.appendChild(el("p", "muted", "next token after the text, without and with " + fmt(d.scale) +
          " added to the neuron · KL " + fmt(d.kl) + " nats · " + d.elapsed_ms + " ms"));
        const grid = el("div", "grid");
        grid.appendChild(steerTable("most likely, steered", d.steered, "steered"));
        grid.appendChild(steerTable("most promoted", d.promoted, "promoted"));
        grid.appendChild(steerTable("most suppressed", d.suppressed, "suppressed"));
        steerResult.appendChild(grid);
        steerStatus.textContent = "";
      } catch (e) {
        steerStatus.textContent = e.message;
        steerStatus.className = "error";
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const root = document.getElementById("live");
    if (root) setup(root);
  });
})();
