// One card per photo: its score, the rating distribution, and on demand the heat map
// ("Why this score", POST /explain) and the enhancement ("Raise the score", POST /enhance).
// Text from files and from the service is only ever set as text, never as HTML.

import { postFile } from "./api.js";

const SVG = "http://www.w3.org/2000/svg";

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const two = (x) => x.toFixed(2);

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

// Ten bars, ratings 1 to 10, each as tall as its probability relative to the largest.
function distributionChart(dist) {
  const chart = svg("svg", { viewBox: "0 0 200 52", class: "bars", role: "img",
    "aria-label": "predicted share of each rating: " + dist.map((p, i) => `${i + 1}: ${Math.round(100 * p)}%`).join(", ") });
  const top = Math.max(...dist) || 1;
  dist.forEach((p, i) => {
    const h = Math.max(0.5, (38 * p) / top);
    const bar = svg("rect", { x: i * 20 + 3, y: 40 - h, width: 14, height: h });
    const tip = svg("title", {});
    tip.textContent = `rating ${i + 1}: ${(100 * p).toFixed(1)} %`;
    bar.append(tip);
    const label = svg("text", { x: i * 20 + 10, y: 51 });
    label.textContent = String(i + 1);
    chart.append(bar, label);
  });
  return chart;
}

function stem(name) {
  const dot = name.lastIndexOf(".");
  return dot > 0 ? name.slice(0, dot) : name;
}

export class Card {
  // hooks: {changed(): a score arrived or failed, denied(error): the service refused the key}
  constructor(file, index, hooks) {
    this.file = file;
    this.index = index;
    this.hooks = hooks;
    this.state = "pending";
    this.result = null;
    this.model = null;
    this.error = "";
    this.urls = [];
    this.figure = el("figure", { class: "photo" });
    this.badge = el("span", { class: "badge" });
    this.badge.hidden = true;
    this.scoreLine = el("p", { class: "score", text: "scoring…" });
    this.body = el("div", { class: "body" });
    this.el = el("li", { class: "card pending" }, this.figure,
      el("h3", { class: "name", title: file.name, text: file.name }), this.badge, this.scoreLine, this.body);
  }

  get name() { return this.file.name; }

  get mean() { return this.state === "done" ? this.result.mean : null; }

  objectUrl() {
    const url = URL.createObjectURL(this.file);
    this.urls.push(url);
    return url;
  }

  release() {
    this.urls.forEach((url) => URL.revokeObjectURL(url));
    this.urls = [];
  }

  setBadge(text) {
    this.badge.textContent = text;
    this.badge.hidden = !text;
  }

  setError(message) {
    this.state = "error";
    this.error = message;
    this.el.className = "card error";
    this.figure.replaceChildren(el("span", { class: "no-preview", text: "not scored" }));
    this.scoreLine.replaceChildren(el("span", { class: "error-text", role: "alert", text: message }));
    this.hooks.changed();
  }

  setScore(result, model) {
    this.state = "done";
    this.result = result;
    this.model = model;
    this.el.className = "card done";
    this.photo = el("img", { alt: this.name, src: this.objectUrl() });
    // A format the browser cannot draw (TIFF in most): the score stands, the preview does not.
    this.photo.addEventListener("error", () => this.photo.replaceWith(
      el("span", { class: "no-preview", text: "no preview in this browser" })), { once: true });
    this.heat = el("img", { class: "heat", alt: `heat map of ${this.name}` });
    this.heat.hidden = true;
    this.figure.replaceChildren(this.photo, this.heat);
    this.scoreLine.replaceChildren(el("span", { class: "mean", text: two(result.mean) }),
      el("span", { class: "std", text: ` std ${two(result.std)}` }));
    this.explainButton = el("button", { type: "button", "aria-pressed": "false", text: "Why this score" });
    this.enhanceButton = el("button", { type: "button", "aria-expanded": "false", text: "Raise the score" });
    this.explainButton.addEventListener("click", () => this.toggleExplain());
    this.enhanceButton.addEventListener("click", () => this.toggleEnhance());
    this.explainPanel = el("div", { class: "explain-panel" });
    this.explainPanel.hidden = true;
    this.enhancePanel = el("div", { class: "enhance-panel" });
    this.enhancePanel.hidden = true;
    this.message = el("p", { class: "error-text", role: "alert" });
    this.message.hidden = true;
    this.body.replaceChildren(distributionChart(result.distribution),
      el("p", { class: "model-name", text: `${model.base_model} · ${model.checkpoint}` }),
      el("div", { class: "actions" }, this.explainButton, this.enhanceButton),
      this.message, this.explainPanel, this.enhancePanel);
    this.hooks.changed();
  }

  // The route's entry for this photo, or null after showing why there is none.
  async ask(route, button, busyText, query = "") {
    const label = button.textContent;
    button.disabled = true;
    button.textContent = busyText;
    this.message.hidden = true;
    try {
      const { result } = await postFile(route, this.file, query);
      if (result.error) throw new Error(result.error);
      return result;
    } catch (err) {
      this.message.textContent = err.message;
      this.message.hidden = false;
      if (err.status === 401) this.hooks.denied(err);
      return null;
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  }

  async toggleExplain() {
    const on = this.explainButton.getAttribute("aria-pressed") !== "true";
    if (on && !this.explained) {
      const result = await this.ask("/explain", this.explainButton, "Explaining…");
      if (!result) return;
      this.explained = result;
      this.heat.src = result.heatmap;
      this.explainPanel.replaceChildren(
        el("p", { text: `${result.method} on ${result.layer}: red raises, blue lowers the predicted mean.` }),
        el("div", { class: "legend", "aria-hidden": "true" }, el("span", { text: "lowers" }), el("span", { class: "ramp" }),
          el("span", { text: "raises" })));
    }
    this.explainButton.setAttribute("aria-pressed", String(on));
    this.heat.hidden = !on;
    if (this.photo.isConnected) this.photo.hidden = on;
    this.explainPanel.hidden = !on;
  }

  async toggleEnhance() {
    const open = this.enhanceButton.getAttribute("aria-expanded") !== "true";
    if (open && !this.enhanced) {
      const result = await this.ask("/enhance", this.enhanceButton, "Searching…");
      if (!result) return;
      this.enhanced = result;
      this.enhancePanel.replaceChildren(...this.enhancement(result));
    }
    this.enhanceButton.setAttribute("aria-expanded", String(open));
    this.enhancePanel.hidden = !open;
  }

  enhancement(r) {
    const settings = Object.entries(r.params).map(([name, v]) => `${name} ${two(v)}`).join(", ");
    const parts = [
      el("div", { class: "before-after" },
        el("figure", {}, el("img", { src: this.objectUrl(), alt: `${this.name} as it is` }),
          el("figcaption", {}, "before ", el("strong", { class: "score-before", text: two(r.score_before) }))),
        el("figure", {}, el("img", { class: "enhanced", src: r.image, alt: `${this.name} enhanced` }),
          el("figcaption", {}, "after ", el("strong", { class: "score-after", text: two(r.score_after) })))),
      el("p", { class: "settings", text: r.raised ? `Settings: ${settings}` : r.note }),
      el("a", { class: "download", href: r.image, download: `${stem(this.name)}-enhanced.jpg`,
        text: "Download the enhanced photo" }),
    ];
    if (r.sweep) {
      const s = r.sweep;
      const neutral = s.values[Math.floor(s.values.length / 2)];
      const items = s.values.map((v, i) => el("li", {},
        el("img", { src: s.images[i], alt: `${s.param} ${two(v)}` }),
        el("span", { class: "sweep-value", text: `${s.param} ${two(v)}${s.values.length % 2 && v === neutral ? " (as is)" : ""}` }),
        el("span", { class: "sweep-score", text: `mean ${two(s.scores[i])}` })));
      parts.push(el("h4", { text: `${s.param[0].toUpperCase()}${s.param.slice(1)} sweep` }),
        el("ol", { class: "sweep", "aria-label": `${s.param} sweep` }, ...items));
    }
    return parts;
  }
}
