// Renders a neuronhunter browser page with a minimal DOM (enough for report/assets/browser.js) and prints the
// resulting tree as JSON: {tag, cls, text, attrs, children}. Used by tests/unit/test_browser.py via node.
"use strict";
const fs = require("fs");
const vm = require("vm");

class Node {
  constructor(tag) {
    this.tag = tag; this.children = []; this.attrs = {}; this.className = ""; this._text = null;
    this.listeners = {}; this.dataset = {}; this.style = {}; this.value = "";
    const self = this;
    this.classList = {add: c => { self.className = (self.className + " " + c).trim(); },
                      remove: c => { self.className = self.className.split(" ").filter(x => x !== c).join(" "); }};
  }
  set textContent(v) { this._text = String(v); this.children = []; }
  get textContent() { return this._text !== null ? this._text : this.children.map(c => c.textContent).join(""); }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  append(...items) { for (const i of items) this.children.push(typeof i === "string" ? text(i) : i); }
  replaceChildren(...items) { this.children = []; this._text = null; this.append(...items); }
  addEventListener(ev, fn) { (this.listeners[ev] = this.listeners[ev] || []).push(fn); }
  click() { for (const fn of this.listeners.click || []) fn(); }
  scrollIntoView() {}
  toJSON() {
    return {tag: this.tag, cls: this.className, attrs: this.attrs, text: this._text,
            children: this.children.map(c => c.toJSON())};
  }
}
function text(s) { const n = new Node("#text"); n._text = s; n.toJSON = () => ({tag: "#text", text: s}); return n; }

const html = fs.readFileSync(process.argv[2], "utf8");
const data = /<script id='data' type='application\/json'>([\s\S]*?)<\/script>/.exec(html)[1];
const kind = /<div id='app' data-kind='(\w+)'>/.exec(html)[1];
const scripts = [...html.matchAll(/<script>([\s\S]*?)<\/script>/g)].map(m => m[1]);
const app = new Node("div"); app.dataset.kind = kind;
const dataNode = new Node("script"); dataNode._text = data;
const document = {
  getElementById: id => (id === "data" ? dataNode : id === "app" ? app : null),
  createElement: tag => new Node(tag),
  createElementNS: (_ns, tag) => new Node(tag),
  title: "",
};
const location = {hash: process.argv[3] || "", href: ""};
const history = {replaceState: (_a, _b, h) => { location.hash = h; }};
const sandbox = {document, location, history, console, JSON, Math, Number, String, Object, Set, Array};
vm.createContext(sandbox);
for (const s of scripts) vm.runInContext(s, sandbox);
process.stdout.write(JSON.stringify({title: document.title, hash: location.hash, app: app.toJSON()}));
