// keras_irtf demo page: plain JavaScript, no framework, nothing loaded from elsewhere.
// It talks to the demo server only: /api/info, /api/gallery, /gallery/<id>, /api/search.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  offset: 0,
  pageSize: 60,
  reference: null, // {kind: "gallery", id, path} or {kind: "upload", b64, name, url}
  busy: false,
};

async function api(url, options) {
  let resp;
  try {
    resp = await fetch(url, options);
  } catch (e) {
    throw new Error("the demo server did not answer (" + e.message + "): is it still running?");
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (e) {
    body = null;
  }
  if (!resp.ok) {
    throw new Error((body && body.error) || ("the server answered HTTP " + resp.status));
  }
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children || []) node.appendChild(child);
  return node;
}

function crispWhenEnlarged(img) {
  // small images (CSS scenes are 64 x 64) are shown enlarged without blur
  img.addEventListener("load", () => {
    if (img.naturalWidth && img.naturalWidth < img.clientWidth) img.classList.add("pixelated");
  });
  return img;
}

function mb(bytes) {
  return (bytes / 1024 / 1024).toFixed(1);
}

// ---- start ----------------------------------------------------------------------------------

async function init() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    $("model-line").textContent = "";
    showError("Could not load the model description: " + e.message);
    return;
  }
  const info = state.info;
  const m = info.model;
  const parts = [`model ${m.name}, version ${m.version}`];
  if (m.method) parts.push(m.method);
  parts.push(`gallery of ${info.gallery.size} images`);
  parts.push(`REST API: POST ${info.rest_url}`);
  $("model-line").textContent = parts.join(" \u00b7 ");
  $("limit-mb").textContent = mb(info.limits.max_upload_bytes);
  $("limit-mp").textContent = (info.limits.max_pixels / 1e6).toFixed(0);
  $("k").max = Math.min(info.limits.max_k, Math.max(1, info.gallery.size));
  $("known-label").hidden = !info.ground_truth;
  $("identical-hint").hidden = !info.identical_uploads;
  showScoreLabel(info.scores);
  if (!info.retrieve) {
    $("search").disabled = true;
    showError("This export has no retrieve endpoint (it was exported without --gallery): the page cannot " +
              "search. Export the run again with --gallery DIR.");
  } else if (!info.gallery.files) {
    showError(`The gallery images are not under ${info.gallery.root}: thumbnails cannot be shown. ` +
              "Start the demo with --gallery DIR.");
  }
  await loadGallery();
}

// ---- gallery --------------------------------------------------------------------------------

async function loadGallery() {
  const q = encodeURIComponent($("gallery-search").value);
  const known = $("gallery-known").checked;
  let data;
  try {
    data = await api(`/api/gallery?q=${q}&offset=${state.offset}&limit=${state.pageSize}&known=${known}`);
  } catch (e) {
    showError("Could not list the gallery: " + e.message);
    return;
  }
  const grid = $("gallery-grid");
  grid.replaceChildren();
  for (const item of data.items) {
    const img = crispWhenEnlarged(el("img", {src: `/gallery/${item.id}`, alt: item.path, loading: "lazy"}));
    const button = el("button", {type: "button", class: "thumb" + (item.known ? " known" : ""),
                                 title: item.path + (item.known ? " (has known queries)" : ""),
                                 "data-id": item.id, "data-path": item.path}, [img]);
    if (state.reference && state.reference.kind === "gallery" && state.reference.id === item.id) {
      button.classList.add("selected");
    }
    button.addEventListener("click", () => pickGallery(item));
    grid.appendChild(button);
  }
  const first = data.total ? data.offset + 1 : 0;
  $("gallery-count").textContent = `${first}\u2013${data.offset + data.items.length} of ${data.total}`;
  $("prev").disabled = state.offset === 0;
  $("next").disabled = data.offset + data.items.length >= data.total;
}

async function pickGallery(item) {
  showError("");
  state.reference = {kind: "gallery", id: item.id, path: item.path};
  for (const b of document.querySelectorAll("#gallery-grid .thumb")) {
    b.classList.toggle("selected", Number(b.dataset.id) === item.id);
  }
  showReference(`/gallery/${item.id}`, item.path);
  $("exclude").disabled = false;
  const box = $("suggestions");
  box.replaceChildren();
  if (!state.info.ground_truth) return;
  try {
    const data = await api(`/api/gallery/${item.id}/texts`);
    if (!state.reference || state.reference.id !== item.id) return; // another pick meanwhile
    for (const text of data.texts.slice(0, 12)) {
      const chip = el("button", {type: "button", text, title: "a known modification of this image"});
      chip.addEventListener("click", () => { $("text").value = text; $("text").focus(); });
      box.appendChild(chip);
    }
  } catch (e) {
    // suggestions are a convenience: the search works without them
  }
}

function showScoreLabel(scores) {
  // what the number under each result is: the cosine similarity (or, failing that, the raw score)
  $("score-label").textContent = scores ? "Scores: " + scores.text + "." : "";
  $("score-label").dataset.shown = scores ? scores.shown : "";
}

function showReference(src, name) {
  const img = $("reference-img");
  img.src = src;
  img.hidden = false;
  crispWhenEnlarged(img);
  $("reference-name").textContent = name;
}

// ---- upload ---------------------------------------------------------------------------------

function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function pickUpload() {
  showError("");
  const file = $("upload").files[0];
  if (!file) return;
  const limit = state.info.limits.max_upload_bytes;
  if (file.size > limit) {
    state.reference = null;
    showError(`${file.name} is ${mb(file.size)} MB; this server accepts images up to ${mb(limit)} MB.`);
    return;
  }
  const b64 = await readAsBase64(file);
  if (state.reference && state.reference.url) URL.revokeObjectURL(state.reference.url);
  const url = URL.createObjectURL(file);
  state.reference = {kind: "upload", b64, name: file.name, url};
  for (const b of document.querySelectorAll("#gallery-grid .thumb.selected")) b.classList.remove("selected");
  showReference(url, file.name + " (uploaded)");
  $("suggestions").replaceChildren();
  // the box applies when the upload turns out to be byte-identical to a gallery image
  $("exclude").disabled = !state.info.identical_uploads;
}

// ---- search ---------------------------------------------------------------------------------

async function search(event) {
  event.preventDefault();
  if (state.busy) return;
  showError("");
  const ref = state.reference;
  if (!ref) {
    showError("Pick a reference image from the gallery or upload one first.");
    return;
  }
  const k = Number($("k").value);
  const body = {text: $("text").value, k, exclude_reference: $("exclude").checked};
  if (ref.kind === "gallery") body.image_id = ref.id;
  else { body.image = {b64: ref.b64}; body.filename = ref.name; }

  state.busy = true;
  $("search").disabled = true;
  $("results-panel").setAttribute("aria-busy", "true");
  const start = performance.now();
  try {
    const data = await api("/api/search", {method: "POST", headers: {"Content-Type": "application/json"},
                                           body: JSON.stringify(body)});
    renderResults(data, ref);
    const ms = performance.now() - start;
    const latency = $("latency");
    latency.dataset.ms = ms.toFixed(2);
    latency.dataset.serverMs = String(data.timing.server_ms);
    latency.dataset.modelMs = String(data.timing.model_ms);
    latency.textContent = `${ms.toFixed(0)} ms per query (server ${data.timing.server_ms.toFixed(1)} ms, ` +
                          `of which the model ${data.timing.model_ms.toFixed(1)} ms)`;
  } catch (e) {
    clearResults();
    showError(e.message);
  } finally {
    state.busy = false;
    $("search").disabled = !state.info.retrieve;
    $("results-panel").setAttribute("aria-busy", "false");
  }
}

function clearResults() {
  $("results").replaceChildren();
  $("query-card").hidden = true;
  $("latency").textContent = "";
  delete $("latency").dataset.ms;
  $("gt-line").textContent = "";
  $("reference-note").hidden = true;
}

function renderResults(data, ref) {
  const card = $("query-card");
  const src = ref.kind === "gallery" ? `/gallery/${ref.id}` : ref.url;
  card.replaceChildren(
    el("div", {class: "hint", text: "query"}),
    crispWhenEnlarged(el("img", {src, alt: "reference image"})),
    el("div", {class: "text", text: data.query.text ? `\u201c${data.query.text}\u201d` : "(no text)"}),
  );
  card.hidden = false;

  const same = data.query.identical_to;
  const note = $("reference-note");
  if (same) {
    let text = `The uploaded image is byte-identical to gallery image ${same.path} (id ${same.image_id}): ` +
               "it is searched as that image's query";
    text += data.query.exclude_reference
      ? ", and that image is left out of its own results, as the evaluation does."
      : "; that image is kept in the results (\u201cleave the reference image out\u201d is unchecked).";
    if (same.also.length) text += ` ${same.also.length} more gallery file(s) hold the same bytes.`;
    note.textContent = text;
    note.dataset.imageId = String(same.image_id);
    note.hidden = false;
  } else {
    note.textContent = "";
    delete note.dataset.imageId;
    note.hidden = true;
  }
  showScoreLabel(data.scores);
  const cosine = data.scores && data.scores.shown === "cosine similarity";

  const grid = $("results");
  grid.replaceChildren();
  for (const r of data.results) {
    const raw = r.score === null ? "n/a" : r.score.toFixed(3);
    const shown = cosine ? (r.cosine === null ? "n/a" : r.cosine.toFixed(3)) : raw;
    const figure = el("figure", {class: "result" + (r.target ? " target" : ""),
                                 title: `${r.path}\nthe model's raw score (dot product): ${raw}`,
                                 "data-id": r.id, "data-rank": r.rank, "data-score": r.score,
                                 "data-cosine": r.cosine}, [
      crispWhenEnlarged(el("img", {src: `/gallery/${r.id}`, alt: r.path})),
      el("figcaption", {}, [
        el("span", {class: "rank", text: `#${r.rank}`}),
        el("span", {class: "score", text: shown, title: cosine ? "cosine similarity" : "raw score"}),
        el("span", {class: "name", text: r.path}),
      ]),
    ]);
    if (r.target) figure.appendChild(el("span", {class: "badge", text: "\u2713 target"}));
    grid.appendChild(figure);
  }

  const gt = data.ground_truth;
  let line = "";
  if (gt && gt.known) {
    line = `Known query: ${gt.targets} target image(s) in the gallery, ${gt.found} among these ` +
           `${data.results.length} results. Green frame: ${gt.protocol}.`;
  } else if (gt) {
    line = "No ground truth for this query (not one of the known modifications of a gallery image).";
  }
  $("gt-line").textContent = line;
}

// ---- wiring ---------------------------------------------------------------------------------

function selectTab(name) {
  $("tab-gallery").classList.toggle("active", name === "gallery");
  $("tab-upload").classList.toggle("active", name === "upload");
  $("pane-gallery").hidden = name !== "gallery";
  $("pane-upload").hidden = name !== "upload";
}

let filterTimer = null;
function refilter() {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => { state.offset = 0; loadGallery(); }, 200);
}

$("tab-gallery").addEventListener("click", () => selectTab("gallery"));
$("tab-upload").addEventListener("click", () => selectTab("upload"));
$("gallery-search").addEventListener("input", refilter);
$("gallery-known").addEventListener("change", refilter);
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.pageSize); loadGallery(); });
$("next").addEventListener("click", () => { state.offset += state.pageSize; loadGallery(); });
$("upload").addEventListener("change", () => pickUpload().catch((e) => showError("Could not read the file: " + e.message)));
$("query-form").addEventListener("submit", search);
init();
