// The catalens page: one photo in, matching catalog items out. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, stats: null, lastMode: null };

function text(value) { return value === undefined || value === null ? "" : String(value); }

async function apiJson(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText;
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return body;
}

function setStatus(message, isError) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

async function loadStats() {
  try {
    const stats = await apiJson("/stats");
    state.stats = stats;
    $("stats").textContent = `${stats.items} items in ${stats.categories} categories`;
    const select = $("mode");
    select.innerHTML = "";
    for (const mode of stats.modes) {
      const option = document.createElement("option");
      option.value = option.textContent = mode;
      option.selected = mode === stats.default_mode;
      select.appendChild(option);
    }
    const list = $("categories");
    for (const name of Object.keys(stats.top_categories)) {
      const option = document.createElement("option");
      option.value = name;
      list.appendChild(option);
    }
    if (!stats.features.classify) $("classify").textContent = "not available on this server";
    if (!stats.features.anomaly) $("anomaly").textContent = "not available on this server";
  } catch (error) {
    $("stats").textContent = `index unavailable: ${error.message}`;
  }
}

// A photo's answers must never sit beside another photo's: a new photo, or an error, clears them.
function clearVerdicts() {
  $("match").textContent = "—";
  $("classify").textContent = state.stats && !state.stats.features.classify ? "not available on this server" : "—";
  const anomaly = $("anomaly");
  anomaly.textContent = state.stats && !state.stats.features.anomaly ? "not available on this server" : "—";
  anomaly.className = "";
  $("grid").innerHTML = "";
  $("located-list").innerHTML = "";
  $("boxes").innerHTML = "";
  $("labels").innerHTML = "";
}

// Two screens for a photo: the search results (grid and verdicts), or the products located in it.
function showScreen(name) {
  const locating = name === "locate";
  $("located").hidden = !locating;
  $("grid").hidden = locating;
  $("verdicts").hidden = locating;
  $("back").hidden = !locating;
}

// An error about the photo itself (unreadable, too large, not an image) is the same for every
// question: the status line says it once, and the verdict boxes stay empty.
const PHOTO_ERRORS = [400, 413, 415, 422];

function pick(file) {
  if (!file) return;
  state.file = file;
  clearVerdicts();
  showScreen("search");
  $("audit").innerHTML = "";
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-hint").hidden = true;
  $("go").disabled = false;
  $("locate").disabled = false;
  runAll();
}

function form(extra) {
  const data = new FormData();
  if (state.file) data.append("image", state.file, state.file.name || "photo");
  for (const [key, value] of Object.entries(extra || {})) {
    if (value !== undefined && value !== null && value !== "") data.append(key, value);
  }
  return data;
}

function searchParams() {
  return { k: $("k").value || "12", mode: $("mode").value, category: $("category").value.trim() };
}

// Words alone, or with the photo (fused search); the photo's other verdicts are not asked again.
function wordParams() {
  const words = $("text").value.trim();
  if (!words) return {};
  return state.file ? { text: words, mode: "fused" } : { text: words };
}

async function runSearch() {
  $("audit").innerHTML = "";
  showScreen("search");
  const params = searchParams();
  setStatus("searching…");
  $("grid").innerHTML = "";
  $("match").textContent = "…";
  try {
    const body = await apiJson("/search", { method: "POST", body: form({ ...params, ...wordParams() }) });
    state.lastMode = body.mode;
    renderHits(body);
    renderMatch(body);
    setStatus(`${body.results.length} results in ${body.seconds.toFixed(2)} s (mode ${body.mode}). ` +
      "Score ranks the results (its scale depends on the mode); confidence is the calibrated chance " +
      "that the item shows the photographed product.");
  } catch (error) {
    clearVerdicts();
    setStatus(`search failed: ${error.message}`, true);
  }
}

const percent = (value) => `${Math.round(100 * value)}%`;

function renderMatch(body) {
  // The verdict the index is calibrated for: the top result, or why there is no confident match.
  const top = body.results[0];
  let text = "—";
  if (top && top.confidence !== null && top.confidence !== undefined) {
    const name = top.title || top.id;
    if (body.match) {
      text = `${name} (confidence ${percent(top.confidence)})`;
    } else if (body.threshold !== null && body.threshold !== undefined && body.threshold >= 1) {
      text = `no confident match: mode ${body.mode} cannot judge its matches on this catalog ` +
        `(best: ${name}, confidence ${percent(top.confidence)}); try another mode`;
    } else {
      const needed = body.threshold == null ? "" : `, ${percent(body.threshold)} needed`;
      text = `no confident match (best: ${name}, confidence ${percent(top.confidence)}${needed})`;
    }
  } else if (top) {
    text = "this index has no match calibration (run catalens calibrate)";
  }
  $("match").textContent = text;
}

function renderHits(body) {
  const grid = $("grid");
  body.results.forEach((hit, rank) => {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = hit.id;
    const image = document.createElement("img");
    image.loading = "lazy";
    image.alt = hit.title;
    image.src = `${hit.image_url}?size=256`;
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    meta.innerHTML = `<div class="title"></div><div class="category"></div>` +
      `<dl><dt>rank</dt><dd class="rank">#${rank + 1}</dd><dt>confidence</dt><dd class="confidence">–</dd>` +
      `<dt>score</dt><dd class="score"></dd></dl>`;
    if (hit.confidence !== null && hit.confidence !== undefined) {
      meta.querySelector(".confidence").textContent = percent(hit.confidence);
      if (rank > 0 && hit.confidence > (body.results[0].confidence ?? 1)) {
        card.classList.add("likelier");
        card.title = "more likely than the first result to show the photographed product";
      }
    }
    meta.querySelector(".score").textContent = hit.score.toFixed(3);
    meta.querySelector(".title").textContent = hit.title || hit.id;
    meta.querySelector(".category").textContent = hit.category;
    card.append(image, meta);
    card.addEventListener("click", () => showDetail(hit));
    grid.appendChild(card);
  });
}

function describeClassification(result) {
  // The best guess at the leaf first, then how deep it is sure and each level's confidence.
  if (!result.category) return JSON.stringify(result);
  const levels = result.levels || [];
  if (!levels.length) return result.category;
  const guess = result.guess || levels.map((level) => level.name).join("/");
  const sure = result.sure_depth ?? (result.category === "unknown" ? 0 : result.category.split("/").length);
  const needed = result.sure_at ?? 0.9;
  const marks = levels.map((level, depth) => `${level.name} ${percent(level.confidence)}${depth < sure ? " ✓" : ""}`);
  const depth = sure === levels.length ? "sure at every level"
    : sure ? `sure down to ${result.category}` : "not sure at any level";
  return `${guess}: ${depth} (${marks.join(" › ")}; sure from ${percent(needed)})`;
}

function describeAnomaly(result) {
  const flag = result.anomalous ?? result.is_anomaly ?? result.anomaly ?? result.verdict;
  const score = result.score ?? result.anomaly_score;
  const threshold = result.threshold;
  const parts = [];
  if (flag !== undefined) parts.push(typeof flag === "boolean" ? (flag ? "ANOMALY" : "normal") : text(flag));
  if (score !== undefined) parts.push(`score ${Number(score).toFixed(3)}`);
  if (threshold !== undefined) parts.push(`threshold ${Number(threshold).toFixed(3)}`);
  return { line: parts.length ? parts.join(", ") : JSON.stringify(result), bad: flag === true || flag === "anomalous" };
}

async function runClassify() {
  if (!state.stats || !state.stats.features.classify) return;
  $("classify").textContent = "…";
  try {
    $("classify").textContent = describeClassification(await apiJson("/classify", { method: "POST", body: form() }));
  } catch (error) {
    $("classify").textContent = PHOTO_ERRORS.includes(error.status) ? "—" : error.message;
  }
}

async function runAnomaly() {
  if (!state.stats || !state.stats.features.anomaly) return;
  const box = $("anomaly");
  box.textContent = "…";
  box.className = "";
  try {
    const verdict = describeAnomaly(await apiJson("/anomaly", { method: "POST", body: form() }));
    box.textContent = verdict.line;
    box.className = verdict.bad ? "bad" : "good";
  } catch (error) {
    box.textContent = PHOTO_ERRORS.includes(error.status) ? "—" : error.message;
  }
}

async function showDetail(hit) {
  const dialog = $("detail");
  $("detail-title").textContent = hit.title || hit.id;
  $("detail-meta").textContent = `${hit.id} · ${hit.category} · score ${hit.score.toFixed(3)}`;
  const image = $("detail-image");
  const note = $("detail-note");
  image.src = hit.image_url;
  note.textContent = "";
  dialog.showModal();
  const mode = state.lastMode;
  if (mode !== "local" && mode !== "fused") {
    note.textContent = "Matched keypoints are shown for modes local and fused.";
    return;
  }
  if (!state.stats.features.explain) {
    note.textContent = "Matched keypoints are not available on this server.";
    return;
  }
  note.textContent = "drawing matched keypoints…";
  const params = searchParams();
  try {
    const response = await fetch("/explain", { method: "POST", body: form({ ...params, mode, id: hit.id }) });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      note.textContent = body.detail || response.statusText;
      return;
    }
    image.src = URL.createObjectURL(await response.blob());
    note.textContent = "Lines join the keypoints the photo and this item share.";
  } catch (error) {
    note.textContent = error.message;
  }
}

// Several products in one photo: POST /locate, its boxes drawn over the photo (in the photo's pixels).
async function runLocate() {
  if (!state.file) return;
  setStatus("finding the products in the photo…");
  $("audit").innerHTML = "";
  $("located-list").innerHTML = "";
  $("boxes").innerHTML = "";
  $("labels").innerHTML = "";
  showScreen("locate");
  try {
    const body = await apiJson("/locate", { method: "POST", body: form() });
    const photo = $("located-photo");
    photo.src = $("preview").src;
    await photo.decode().catch(() => {});
    const svg = $("boxes");
    svg.setAttribute("viewBox", `0 0 ${photo.naturalWidth} ${photo.naturalHeight}`);
    svg.innerHTML = "";
    const list = $("located-list");
    list.innerHTML = "";
    const stroke = Math.max(2, Math.round(Math.max(photo.naturalWidth, photo.naturalHeight) / 300));
    const labels = $("labels");
    const width = photo.naturalWidth, height = photo.naturalHeight;
    body.detections.forEach((found, rank) => {
      const [x0, y0, x1, y1] = found.box;
      const ns = "http://www.w3.org/2000/svg";
      const rect = document.createElementNS(ns, "rect");
      Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0, "stroke-width": stroke })
        .forEach(([key, value]) => rect.setAttribute(key, value));
      svg.append(rect);
      // Labels are HTML at the page's font size, placed in percent of the photo: readable at any
      // photo size, where SVG text shrank with the photo to ~10 px.
      const label = document.createElement("span");
      label.className = "box-label";
      label.style.left = `${(100 * x0) / width}%`;
      label.style.top = `${(100 * y0) / height}%`;
      if (y0 / height < 0.08) label.classList.add("inside");  // no room above the box: inside its top
      const sure = found.confidence == null ? "" : ` · ${percent(found.confidence)}`;
      label.textContent = `${rank + 1}. ${found.title || found.id}${sure}`;
      labels.appendChild(label);
      const line = document.createElement("li");
      line.textContent = `${found.title || found.id} (${found.category}): confidence ` +
        (found.confidence == null ? "not available" : percent(found.confidence)) + `, score ${found.score.toFixed(2)}`;
      list.appendChild(line);
    });
    setStatus(`${body.detections.length} products found in ${body.seconds.toFixed(2)} s. Confidence: the calibrated ` +
      "chance that the box shows that product's category.");
  } catch (error) {
    showScreen("search");
    setStatus(`locate failed: ${error.message}`, true);
  }
}

function runAll() {
  if (!state.file) return;
  runSearch();
  runClassify();
  runAnomaly();
}

// --- catalog audit: each finding with its neighbours, to confirm or dismiss

function thumb(id, size) {
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = id;
  img.src = `/items/${encodeURIComponent(id)}/image?size=${size}`;
  return img;
}

function describeFinding(finding) {
  const score = `${(100 * finding.score).toFixed(1)}%`;
  if (finding.problem === "mislabelled") {
    const inliers = finding.evidence.verified_inliers;
    const verified = inliers
      ? `; keypoints verified: ${inliers.filed} with its leaf, ${inliers.suggested} with the suggested one`
      : "";
    return `mislabelled (${score}): filed under ${finding.category}, looks like ${finding.suggested} (${finding.evidence.level} differs)${verified}`;
  }
  if (finding.problem === "duplicate") {
    const kind = finding.evidence.exact ? "exact copy" : "near copy";
    return `duplicate (${score}): ${kind} of ${finding.evidence.ids.join(", ")}`;
  }
  const like = finding.evidence.looks_like ? `, looks like a ${finding.evidence.looks_like}` : "";
  return `not a product (${score})${like}`;
}

async function dismissFinding(finding, card) {
  let key = sessionStorage.getItem("catalens-key");
  if (!key) {
    key = window.prompt("API key (X-API-Key) to record the dismissal");
    if (!key) return;
  }
  const data = new FormData();
  data.append("dismiss", finding.id);
  try {
    await apiJson("/audit", { method: "POST", body: data, headers: { "X-API-Key": key } });
    sessionStorage.setItem("catalens-key", key);
    card.classList.add("dismissed");
    setStatus(`dismissed ${finding.id}: hidden until the item changes`);
  } catch (error) {
    if (error.status === 401) sessionStorage.removeItem("catalens-key");
    setStatus(`dismiss failed: ${error.message}`, true);
  }
}

function renderFinding(finding) {
  const card = document.createElement("article");
  card.className = "finding";
  card.appendChild(thumb(finding.id, 256));
  const body = document.createElement("div");
  const what = document.createElement("p");
  what.className = "what";
  what.textContent = describeFinding(finding);
  const id = document.createElement("p");
  id.className = "muted";
  id.textContent = `${finding.id} · ${finding.category}`;
  const strip = document.createElement("div");
  strip.className = "neighbours";
  const shown = finding.problem === "duplicate"
    ? finding.evidence.ids.map((other, i) => ({ id: other, category: finding.evidence.categories[i] }))
    : [];
  for (const neighbour of [...shown, ...(finding.evidence.neighbours || [])].slice(0, 8)) {
    const figure = document.createElement("figure");
    const img = thumb(neighbour.id, 128);
    if (neighbour.category !== finding.category) img.className = "other";
    figure.appendChild(img);
    const caption = document.createElement("figcaption");
    caption.textContent = neighbour.category.split("/").pop();
    caption.title = `${neighbour.id} (${neighbour.category})`;
    figure.appendChild(caption);
    strip.appendChild(figure);
  }
  const confirm = document.createElement("button");
  confirm.type = "button";
  confirm.textContent = "Confirm";
  confirm.title = "the finding is right: mark it to fix in the catalog";
  confirm.addEventListener("click", () => card.classList.toggle("confirmed"));
  const dismiss = document.createElement("button");
  dismiss.type = "button";
  dismiss.textContent = "Dismiss";
  dismiss.title = "nothing is wrong: hide this item's findings until it changes (needs the API key)";
  dismiss.addEventListener("click", () => dismissFinding(finding, card));
  body.append(what, id, strip, confirm, dismiss);
  card.appendChild(body);
  return card;
}

async function runAudit() {
  const box = $("audit");
  $("grid").innerHTML = "";
  showScreen("search");
  box.innerHTML = "";
  setStatus("auditing the catalog…");
  const data = new FormData();
  data.append("top", "50");
  if ($("audit-problem").value) data.append("problem", $("audit-problem").value);
  if ($("category").value.trim()) data.append("category", $("category").value.trim());
  try {
    const body = await apiJson("/audit", { method: "POST", body: data });
    for (const finding of body.findings) box.appendChild(renderFinding(finding));
    const hidden = body.dismissed ? `, ${body.dismissed} dismissed` : "";
    setStatus(`${body.findings.length} findings in ${body.items} items (${body.seconds.toFixed(1)} s${hidden})`);
  } catch (error) {
    setStatus(`audit failed: ${error.message}`, true);
  }
}

function wire() {
  $("audit-controls").addEventListener("submit", (event) => { event.preventDefault(); runAudit(); });
  const drop = $("drop");
  $("file").addEventListener("change", (event) => pick(event.target.files[0]));
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file").click(); });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => pick(event.dataTransfer.files[0]));
  $("controls").addEventListener("submit", (event) => { event.preventDefault(); runSearch(); });
  $("text").addEventListener("input", () => { $("go").disabled = !state.file && !$("text").value.trim(); });
  $("locate").addEventListener("click", runLocate);
  $("back").addEventListener("click", () => { showScreen("search"); });
  $("mode").addEventListener("change", () => { if (state.file) runSearch(); });
}

wire();
loadStats();
