// The page of `clipengine serve`: no build step, no dependencies, works offline.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { index: null };

function params(extra) {
  const p = new URLSearchParams({ k: $("k").value || "24", ...extra });
  if (state.index) p.set("index", state.index);
  if ($("prefix").value.trim()) p.set("prefix", $("prefix").value.trim());
  for (const name of ["after", "before", "place", "near", "camera", "ext", "min_size", "kind", "sort"]) {  // as `clipengine search` takes them
    const value = $(name).value.trim();
    if (value) p.set(name, value);
  }
  return p;
}

function groupOf(hit, by) {  // as clipengine.index.hits.group_key: the day where it was taken, its month, its place
  if (by === "place") return hit.place || "no place";
  if (!hit.taken) return "no date";
  return by === "day" ? hit.taken.slice(0, 10) : hit.taken.slice(0, 7);
}

async function call(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

function moment_text(seconds) {  // as Hit.moment says it: "at 0:42", "at 1:02:07"
  const s = Math.floor(seconds), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = String(s % 60).padStart(2, "0");
  return h ? `at ${h}:${String(m).padStart(2, "0")}:${r}` : `at ${m}:${r}`;
}

function render(hits, what, started) {
  const results = $("results");
  results.replaceChildren();
  const by = $("group").value;
  let heading = null;
  for (const hit of hits) {
    if (by && groupOf(hit, by) !== heading) {  // the hits come in order: a heading where the group changes
      heading = groupOf(hit, by);
      const h2 = document.createElement("h2");
      h2.className = "group";
      h2.textContent = heading;
      results.append(h2);
    }
    const card = document.createElement("button");
    card.type = "button";
    card.className = "hit";
    card.dataset.id = hit.id;
    card.title = `more like this: ${hit.path}`;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = hit.path.split("/").pop();
    const moment = hit.seconds == null ? {} : { t: hit.seconds };  // a video: the frame that matched
    img.src = `/api/thumbnail/${hit.id}?` + new URLSearchParams({ ...(state.index ? { index: state.index } : {}), ...moment });
    img.width = 256;
    img.height = 256;
    const meta = document.createElement("span");
    meta.className = "meta";
    const which = new URLSearchParams(state.index ? { index: state.index } : {});
    const at = hit.seconds == null ? "" : `#t=${hit.seconds.toFixed(2)}`;  // a media fragment: the player starts there
    meta.innerHTML = `<span class="score">${hit.rank}. ${hit.score.toFixed(3)}</span> ` +
      (at ? `<span class="moment">${moment_text(hit.seconds)}</span> ` : "") +
      `<a class="view" href="/api/view/${hit.id}?${which}${at}" target="_blank" rel="noopener" tabindex="-1">open</a> ` +
      `<a class="original" href="/api/file/${hit.id}?${which}" download tabindex="-1">original</a>` +
      `<span class="taken"></span><span class="place"></span><span class="path"></span>`;
    meta.querySelector(".path").textContent = hit.path;
    meta.querySelector(".taken").textContent = hit.taken ? hit.taken.slice(0, 10) : "";
    meta.querySelector(".place").textContent = hit.place || "";
    meta.querySelectorAll("a").forEach((a) => a.addEventListener("click", (e) => e.stopPropagation()));
    card.append(img, meta);
    card.addEventListener("click", () => similar(hit.id, hit.path));
    results.append(card);
  }
  const ms = Math.round(performance.now() - started);
  status(hits.length ? `${hits.length} results for ${what} (${ms} ms)` : `no results for ${what}`);
}

async function run(what, request) {
  const started = performance.now();
  status(`searching for ${what}…`);
  try {
    render(await request(), what, started);
  } catch (e) {
    $("results").replaceChildren();
    status(e.message, true);
  }
}

function searchText(q) {
  history.replaceState(null, "", "?" + new URLSearchParams({ q, ...(state.index ? { index: state.index } : {}) }));
  return run(`“${q}”`, () => call("/api/search?" + params({ q })));
}

function similar(id, path) {
  return run(`images like ${path.split("/").pop()}`, () => call(`/api/similar/${id}?` + params()));
}

function searchImage(file) {
  if (!file || !file.type.startsWith("image/")) { status("that is not an image", true); return; }
  const form = new FormData();
  form.append("file", file, file.name || "pasted image");
  return run(`the image ${file.name || "pasted"}`, () => call("/api/search/image?" + params(), { method: "POST", body: form }));
}

async function showInfo() {
  const box = $("info");
  const button = $("show-info");
  if (!box.hidden) { box.hidden = true; button.setAttribute("aria-expanded", "false"); return; }
  try {
    const info = await call("/api/info?" + new URLSearchParams(state.index ? { index: state.index } : {}));
    box.textContent = [
      `index    ${info.path}`,
      `model    ${info.model.identity}  [dim ${info.dim}, ${info.metric}]`,
      `images   ${info.count} searchable, ${info.skipped_files.length} skipped`,
      `search   ${info.faiss.kind} (${info.faiss.factory})`,
      `folders  ${info.folders.join(", ") || "-"}`,
      ...info.advice.map((a) => `advice   ${a}`),
    ].join("\n");
  } catch (e) { box.textContent = e.message; }
  box.hidden = false;
  button.setAttribute("aria-expanded", "true");
}

async function loadIndexes() {
  const select = $("index");
  try {
    const indexes = await call("/api/indexes");
    for (const ix of indexes) {
      const option = document.createElement("option");
      option.value = ix.name;
      option.textContent = `${ix.name} (${ix.count})`;
      select.append(option);
    }
    const wanted = new URLSearchParams(location.search).get("index");
    state.index = indexes.some((ix) => ix.name === wanted) ? wanted : indexes[0]?.name;
    select.value = state.index;
    select.hidden = indexes.length < 2;
    select.parentElement.hidden = indexes.length < 2;
  } catch (e) { status(e.message, true); }
}

document.addEventListener("DOMContentLoaded", async () => {
  await loadIndexes();
  $("index").addEventListener("change", (e) => {
    state.index = e.target.value;
    if ($("query").value.trim()) searchText($("query").value.trim());
  });
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("query").value.trim();
    if (q) searchText(q);
  });
  $("image").addEventListener("change", (e) => searchImage(e.target.files[0]));
  $("show-info").addEventListener("click", showInfo);
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData?.files || [])][0];
    if (file) { e.preventDefault(); searchImage(file); }
  });
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop").hidden = false; });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    searchImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "/" && document.activeElement !== $("query")) { e.preventDefault(); $("query").focus(); }
    if (e.key === "Escape" && document.activeElement === $("query")) $("query").value = "";
  });
  const q = new URLSearchParams(location.search).get("q");
  if (q) { $("query").value = q; searchText(q); }
});
