// The page: the model's description (GET /model), the API key prompt, photos in (file
// input or drag and drop), one POST /score per photo so each card shows as soon as its
// score is back, sorting, the best and worst, and the CSV download.

import { getModel, postFile, setApiKey } from "./api.js";
import { Card, el } from "./cards.js";

const $ = (id) => document.getElementById(id);
const IN_FLIGHT = 3; // requests at once: the service batches them, more would only queue there
const cards = [];
const queue = [];
let running = 0;
let ready = false;

// ---- the model and the key -------------------------------------------------------------

function fact(list, name, value) {
  if (value === null || value === undefined || value === "") return;
  const shown = typeof value === "object" ? JSON.stringify(value) : String(value);
  list.append(el("dt", { text: name }), el("dd", { text: shown }));
}

function showModel(info) {
  const list = $("model-card");
  const args = info.model_args || {};
  const pre = info.preprocessing || {};
  list.replaceChildren();
  fact(list, "checkpoint", info.checkpoint);
  fact(list, "backbone", args.base_model);
  fact(list, "device", info.device + (info.bf16 ? " (bf16)" : ""));
  fact(list, "preprocessing", `shorter side to ${pre.resize_shorter_side} px, ${pre.crop} crop, ` +
    `normalisation ${pre.normalize}` + (pre.tta > 1 ? `, ${pre.tta} test-time crops` : ""));
  const card = info.card && typeof info.card === "object" ? info.card : null;
  if (card) {
    for (const [name, value] of Object.entries(card)) {
      if (name !== "toy" && name !== "warning") fact(list, name.replaceAll("_", " "), value);
    }
  }
  const warning = $("toy-warning");
  warning.hidden = !(card && card.toy === true);
  warning.textContent = card && card.toy === true ? (card.warning ||
    "This is a toy model: its scores are not aesthetic judgements.") : "";
  const formats = info.limits && info.limits.formats;
  if (Array.isArray(formats)) $("formats").textContent = formats.join(", ");
  $("model-status").textContent = "";
}

function setReady(value) {
  ready = value;
  $("files").disabled = !value;
  $("drop").classList.toggle("disabled", !value);
  if (value) pump();
}

function askKey(message) {
  setReady(false);
  $("key").hidden = false;
  $("key-message").textContent = message;
  $("model-status").textContent = "This service needs an API key: nothing can be scored without it.";
  $("key-input").focus();
}

async function loadModel() {
  try {
    showModel(await getModel());
    $("key").hidden = true;
    setReady(true);
  } catch (err) {
    if (err.status === 401) {
      askKey(err.message);
    } else {
      $("model-status").textContent = `The service did not describe its model: ${err.message}`;
      setReady(true); // scoring may still work; each card will say if not
    }
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!/^[\x21-\x7e]+$/.test(key)) {
    $("key-message").textContent = "An API key is printable ASCII without spaces: check what you pasted.";
    return;
  }
  setApiKey(key);
  $("key-input").value = "";
  loadModel();
});

// ---- photos in, scores out -------------------------------------------------------------

const hooks = {
  changed: () => update(),
  denied: (err) => { setApiKey(""); askKey(err.message); },
};

function addFiles(files) {
  for (const file of files) {
    const card = new Card(file, cards.length, hooks);
    cards.push(card);
    queue.push(card);
    $("cards").append(card.el);
  }
  update();
  pump();
}

function pump() {
  while (ready && running < IN_FLIGHT && queue.length) {
    const card = queue.shift();
    running += 1;
    score(card).finally(() => { running -= 1; pump(); });
  }
}

async function score(card) {
  try {
    const { model, result } = await postFile("/score", card.file);
    if (result.error) card.setError(result.error);
    else card.setScore(result, model);
  } catch (err) {
    if (err.status === 401) {
      queue.unshift(card); // scored once the key is given
      hooks.denied(err);
      return;
    }
    card.setError(err.message);
  }
}

$("files").addEventListener("change", (event) => {
  addFiles([...event.target.files]);
  event.target.value = ""; // choosing the same files again adds them again
});

const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (ready) addFiles([...event.dataTransfer.files]);
});
// A photo dropped beside the zone must not replace the page with itself.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

// ---- order, summary, CSV -------------------------------------------------------------

const byName = (a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : a.index - b.index);
const ORDERS = {
  added: (a, b) => a.index - b.index,
  name: byName,
  "score-desc": (a, b) => rank(a, b, -1),
  "score-asc": (a, b) => rank(a, b, 1),
};

function rank(a, b, sign) {
  if (a.mean === null || b.mean === null) return (a.mean === null) - (b.mean === null) || a.index - b.index;
  return sign * (a.mean - b.mean) || byName(a, b);
}

function applyOrder() {
  const focused = document.activeElement;
  const list = $("cards");
  [...cards].sort(ORDERS[$("sort").value]).forEach((card) => list.append(card.el));
  if (focused && focused !== document.activeElement && document.contains(focused)) focused.focus();
}

function update() {
  const done = cards.filter((c) => c.state === "done");
  const failed = cards.filter((c) => c.state === "error").length;
  const waiting = cards.length - done.length - failed;
  const sorted = [...done].sort((a, b) => rank(a, b, -1));
  cards.forEach((c) => c.setBadge(""));
  const parts = [`${done.length} scored`];
  if (failed) parts.push(`${failed} could not be read`);
  if (waiting) parts.push(`${waiting} waiting`);
  if (sorted.length > 1) {
    const best = sorted[0];
    const worst = sorted[sorted.length - 1];
    best.setBadge("best");
    worst.setBadge("worst");
    parts.push(`best: ${best.name} (${best.mean.toFixed(2)})`, `worst: ${worst.name} (${worst.mean.toFixed(2)})`);
  }
  $("summary").textContent = cards.length ? parts.join(" · ") : "";
  $("csv").disabled = done.length === 0;
  $("clear").disabled = cards.length === 0 || waiting > 0;
  applyOrder();
}

$("sort").addEventListener("change", applyOrder);

function csvField(text) {
  return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

// test.py's predictions.csv for these photos: the same columns, rows by image id, 6 decimals
// (the percentile 2, empty when the model has none).
function predictionsCsv() {
  const header = ["image_id", "mean", "std", ...Array.from({ length: 10 }, (_, k) => `p${k + 1}`), "percentile"];
  const rows = cards.filter((c) => c.state === "done").sort(byName).map((c) =>
    [csvField(c.name), ...[c.result.mean, c.result.std, ...c.result.distribution].map((x) => x.toFixed(6)),
      c.result.percentile == null ? "" : c.result.percentile.toFixed(2)].join(","));
  return [header.join(","), ...rows].join("\n") + "\n";
}

$("csv").addEventListener("click", () => {
  const url = URL.createObjectURL(new Blob([predictionsCsv()], { type: "text/csv" }));
  const link = el("a", { href: url, download: "predictions.csv" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
});

$("clear").addEventListener("click", () => {
  cards.forEach((c) => { c.release(); c.el.remove(); });
  cards.length = 0;
  update();
  $("files").focus();
});

loadModel();
