// Refrain's operator console: plain JavaScript against the service's own API, no other host.
"use strict";

const $ = (sel) => document.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("refrain-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("refrain-api-key", keyInput.value));

function headers() {
  return keyInput.value ? { "X-API-Key": keyInput.value } : {};
}

async function api(method, path, body) {
  const r = await fetch(path, { method, body, headers: headers() });
  const data = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (!r.ok) {
    const err = data?.error || { code: String(r.status), message: r.statusText };
    throw new Error(`${err.code}: ${err.message}`);
  }
  return data;
}

function note(id, text, error = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", error);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

const seconds = (s) => (s == null ? "" : `${Math.floor(s / 60)}:${(s % 60).toFixed(1).padStart(4, "0")}`);

// -- tabs and status -------------------------------------------------------------------------

for (const tab of document.querySelectorAll("button.tab")) {
  tab.addEventListener("click", () => {
    document.querySelectorAll("button.tab, .panel").forEach((n) => n.classList.remove("active"));
    tab.classList.add("active");
    $(`#${tab.dataset.tab}`).classList.add("active");
    if (tab.dataset.tab === "catalog" && !$("#tracks tbody").children.length) loadTracks();
  });
}

async function refreshStatus() {
  const s = $("#status");
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    s.textContent = body.status + (body.error ? ` (${body.error})` : "");
    s.className = "status " + (r.ok ? "ready" : "down");
  } catch (e) {
    s.textContent = "unreachable";
    s.className = "status down";
  }
}
refreshStatus();
setInterval(refreshStatus, 10000);

// -- search ----------------------------------------------------------------------------------

let recorded = null;

$("#record").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  if (button.recorder) {
    button.recorder.stop();
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const recorder = new MediaRecorder(stream);
    const chunks = [];
    recorder.ondataavailable = (e) => chunks.push(e.data);
    recorder.onstop = () => {
      stream.getTracks().forEach((t) => t.stop());
      recorded = new Blob(chunks, { type: recorder.mimeType });
      button.recorder = null;
      button.classList.remove("recording");
      button.textContent = "● Record";
      note("#search-note", `recorded ${(recorded.size / 1024).toFixed(0)} KB; press Search`);
    };
    recorder.start();
    button.recorder = recorder;
    button.classList.add("recording");
    button.textContent = "■ Stop";
  } catch (e) {
    note("#search-note", `cannot record: ${e.message}`, true);
  }
});

$("#clip").addEventListener("change", () => { recorded = null; });

$("#search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("#clip").files[0];
  if (!file && !recorded) return note("#search-note", "choose or record a clip first", true);
  const form = new FormData();
  form.append("audio", file || recorded, file ? file.name : "recording.webm");
  form.append("top_k", $("#top-k").value);
  form.append("tune", "true");  // each aligned hit carries the tunes of its first match
  note("#search-note", "searching…");
  $("#results").replaceChildren();
  try {
    const found = await api("POST", "/v1/search", form);
    const t = found.timings_ms;
    note("#search-note", `${found.results.length} tracks for a ${found.query_duration_s.toFixed(1)} s clip ` +
      `(decode ${t.decode} ms, embed ${t.embed} ms, search ${t.search} ms)`);
    for (const hit of found.results) $("#results").append(await hitItem(hit, found.query_duration_s));
  } catch (e) {
    note("#search-note", e.message, true);
  }
});

async function hitItem(hit, queryS) {
  let duration = null;
  try {
    duration = (await api("GET", `/v1/tracks/${encodeURIComponent(hit.track_id)}`)).duration_s;
  } catch (e) { /* the track may have been deleted since */ }
  const score = el("span", { class: "score", title: `score ${hit.score}` });
  score.append(el("span", { style: `width:${(100 * hit.score).toFixed(1)}%` }));
  const head = el("div", { class: "hit-head" },
    el("span", { class: "hit-title" }, hit.title || hit.track_id),
    el("span", { class: "hit-meta" }, [hit.artist, hit.work_id && `work ${hit.work_id}`,
      `id ${hit.track_id}`].filter(Boolean).join(" · ")),
    score,
    el("span", { class: "hit-meta" }, `score ${hit.score.toFixed(3)} · distance ${hit.distance.toFixed(3)}` +
      (hit.alignment != null ? ` · alignment ${hit.alignment.toFixed(1)}` : "") +
      (hit.transposition ? ` · ${hit.transposition > 0 ? "+" : ""}${hit.transposition} semitones` : "")));
  const item = el("li", { "data-track": hit.track_id }, head);
  item.append(timeline(hit.matches, queryS, duration));
  if (hit.tune) item.append(tunePlot(hit.tune));
  return item;
}

// An SVG drawing of `height` units under 1000 wide, stretched to its box, and `add`, which
// appends an element with these attributes (and text) to it.
const SVG_NS = "http://www.w3.org/2000/svg";
function drawing(className, height) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", className);
  svg.setAttribute("viewBox", `0 0 1000 ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text) n.textContent = text;
    svg.append(n);
    return n;
  };
  return { svg, add };
}

// Where the clip matches: the clip's bar on top, the reference's below, each match a band
// from its query range to its reference range.
function timeline(matches, queryS, refS) {
  const { svg, add } = drawing("timeline", 92);
  const refLen = Math.max(refS || 0, ...matches.map((m) => m.ref_end_s), 1);
  const qLen = Math.max(queryS, 1);
  const x = (s, len) => 60 + (930 * s) / len;
  add("text", { x: 0, y: 20 }, "clip");
  add("text", { x: 0, y: 80 }, "reference");
  add("rect", { x: 60, y: 10, width: 930, height: 14, fill: "#e2e8f0" });
  add("rect", { x: 60, y: 68, width: 930, height: 14, fill: "#e2e8f0" });
  add("text", { x: 990, y: 8, "text-anchor": "end" }, seconds(queryS));
  add("text", { x: 990, y: 66, "text-anchor": "end" }, seconds(refLen));
  matches.forEach((m, i) => {
    const q0 = x(m.query_start_s, qLen), q1 = x(m.query_end_s, qLen);
    const r0 = x(m.ref_start_s, refLen), r1 = x(m.ref_end_s, refLen);
    const opacity = i === 0 ? 0.85 : 0.45;
    add("polygon", { points: `${q0},24 ${q1},24 ${r1},68 ${r0},68`, fill: "#dd6b20",
      "fill-opacity": opacity * 0.35, class: "match-band" });
    add("rect", { x: q0, y: 10, width: Math.max(q1 - q0, 2), height: 14, fill: "#dd6b20",
      "fill-opacity": opacity, class: "match-query" });
    add("rect", { x: r0, y: 68, width: Math.max(r1 - r0, 2), height: 14, fill: "#dd6b20",
      "fill-opacity": opacity, class: "match-ref" });
    let label = `${seconds(m.ref_start_s)}–${seconds(m.ref_end_s)}`;
    if (m.tempo_ratio != null) {  // an aligned match: its tempo and key
      label += ` · tempo ×${m.tempo_ratio.toFixed(3)}`;
      if (m.key_shift) label += ` · key ${m.key_shift > 0 ? "+" : ""}${m.key_shift}`;
    }
    add("text", { x: r0, y: 62, class: "match-label" }, label);
  });
  return svg;
}

// The tunes of the first match, one above the other on the clip's seconds: the clip's, and
// the reference's read along the alignment, moved by the match's key shift (and whole
// octaves) onto the clip's key so that the same tune draws the same steps. Pitch lines at
// each C and F, a tick per second or more.
const NOTE_NAMES = ["C", "C♯", "D", "E♭", "E", "F", "F♯", "G", "A♭", "A", "B♭", "B"];
const noteName = (midi) => `${NOTE_NAMES[((midi % 12) + 12) % 12]}${Math.floor(midi / 12) - 1}`;

function tunePlot(tune) {
  const { svg, add } = drawing("tune", 172);
  const n = tune.query.length;
  const voiced = (ps) => ps.filter((p) => p != null).sort((a, b) => a - b);
  const median = (ps) => (ps.length ? ps[Math.floor(ps.length / 2)] : null);
  // the reference onto the clip's key: less the key shift, then the octave nearest the clip's
  const q = voiced(tune.query), r = voiced(tune.reference).map((p) => p - tune.key_shift);
  const octaves = q.length && r.length ? Math.round((median(q) - median(r)) / 12) : 0;
  const moved = octaves * 12 - tune.key_shift;
  const ref = tune.reference.map((p) => (p == null ? null : p + moved));
  const all = [...q, ...r.map((p) => p + octaves * 12)];
  let lo = all.length ? Math.min(...all) - 1 : 59, hi = all.length ? Math.max(...all) + 1 : 72;
  if (hi - lo < 12) { lo -= Math.floor((12 - hi + lo) / 2); hi = lo + 12; }
  const left = 150, width = 840, laneH = 62;  // the lane names on the left, ends as the timeline's
  const x = (i) => left + (width * i) / n;
  const lanes = [
    { y: 6, pitches: tune.query, name: "clip tune", cls: "tune-query", color: "#2b6cb0" },
    { y: 80, pitches: ref, name: "reference tune", cls: "tune-ref", color: "#dd6b20",
      note: moved ? `shown ${moved > 0 ? "+" : "−"}${Math.abs(moved)} semitones` : "" },
  ];
  for (const lane of lanes) {
    const y = (p) => lane.y + laneH - ((p - lo) * laneH) / (hi - lo);
    const step = Math.max(laneH / (hi - lo), 2.5);
    add("rect", { x: left, y: lane.y, width, height: laneH, fill: "#f7f8fa", stroke: "#e2e8f0" });
    for (let p = Math.ceil(lo); p <= hi; p++) {
      if (p % 12 !== 0 && p % 12 !== 5) continue;
      add("line", { x1: left, x2: left + width, y1: y(p), y2: y(p), stroke: p % 12 ? "#edf0f4" : "#d8dce4" });
      if (p % 12 === 0) add("text", { x: left - 4, y: y(p) + 4, "text-anchor": "end", class: "pitch" }, noteName(p));
    }
    add("text", { x: 0, y: lane.y + 14, class: "lane" }, lane.name);
    if (lane.note) add("text", { x: 0, y: lane.y + 29 }, lane.note);
    for (let i = 0; i < n; i++) {  // one step per run of the same pitch
      const p = lane.pitches[i];
      if (p == null) continue;
      let j = i;
      while (j + 1 < n && lane.pitches[j + 1] === p) j++;
      add("rect", { x: x(i), y: y(p) - step / 2, width: Math.max(x(j + 1) - x(i) - 0.6, 1.5),
        height: step, fill: lane.color, rx: 1, class: `note ${lane.cls}` }).append(
        Object.assign(document.createElementNS(SVG_NS, "title"),
          { textContent: `${noteName(lane.pitches === ref ? p - moved : p)} at ${seconds(tune.query_start_s + i / tune.rate)}` }));
      i = j;
    }
  }
  // the clip's seconds, under both lanes
  const span = n / tune.rate;
  const tick = [1, 2, 5, 10, 20, 30, 60].find((t) => span / t <= 12) || 120;
  for (let t = Math.ceil(tune.query_start_s / tick) * tick; t <= tune.query_start_s + span + 1e-6; t += tick) {
    const at = x((t - tune.query_start_s) * tune.rate);
    add("line", { x1: at, x2: at, y1: 148, y2: 152, stroke: "#5b6475" });
    add("text", { x: at, y: 166, "text-anchor": at > 970 ? "end" : "middle" }, seconds(t));
  }
  add("text", { x: 0, y: 166 }, "clip seconds");
  return svg;
}

// -- catalog ---------------------------------------------------------------------------------

let tracksCursor = null;

async function loadTracks(more = false) {
  try {
    const params = new URLSearchParams({ limit: "50" });
    if (more && tracksCursor) params.set("cursor", tracksCursor);
    const page = await api("GET", `/v1/tracks?${params}`);
    if (!more) $("#tracks tbody").replaceChildren();
    page.tracks.forEach(addTrackRow);
    tracksCursor = page.next_cursor;
    $("#more-tracks").disabled = !tracksCursor;
    note("#catalog-note", `${$("#tracks tbody").children.length} tracks shown` + (tracksCursor ? "; more below" : ""));
  } catch (e) {
    note("#catalog-note", e.message, true);
  }
}

function addTrackRow(t) {
  const del = el("button", { type: "button" }, "Delete");
  del.addEventListener("click", async () => {
    if (!confirm(`Delete ${t.track_id}?`)) return;
    try {
      await api("DELETE", `/v1/tracks/${encodeURIComponent(t.track_id)}`);
      row.remove();
      note("#catalog-note", `deleted ${t.track_id}`);
    } catch (e) {
      note("#catalog-note", e.message, true);
    }
  });
  const row = el("tr", {}, el("td", {}, t.track_id), el("td", {}, t.title), el("td", {}, t.artist),
    el("td", {}, t.work_id || ""), el("td", {}, seconds(t.duration_s)), el("td", {}, String(t.n_segments)),
    el("td", {}, del));
  $("#tracks tbody").append(row);
}

$("#more-tracks").addEventListener("click", () => loadTracks(true));

$("#lookup-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const id = $("#lookup-id").value.trim();
  if (!id) return loadTracks();
  try {
    const t = await api("GET", `/v1/tracks/${encodeURIComponent(id)}`);
    $("#tracks tbody").replaceChildren();
    addTrackRow(t);
    note("#catalog-note", `found ${t.track_id}`);
  } catch (e) {
    note("#catalog-note", e.message, true);
  }
});

// -- ingestion -------------------------------------------------------------------------------

$("#ingest-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData();
  const files = $("#ingest-files").files, archive = $("#ingest-archive").files[0];
  for (const f of files) form.append("files", f, f.name);
  if (archive) form.append("archive", archive, archive.name);
  const manifest = $("#ingest-manifest").files[0];
  if (manifest) form.append("manifest", manifest, manifest.name);
  if ($("#ingest-replace").checked) form.append("replace", "true");
  note("#ingest-note", "uploading…");
  try {
    const job = await api("POST", "/v1/ingest", form);
    note("#ingest-note", `job ${job.job_id}: ${job.total} files queued` + (job.ignored ? `, ${job.ignored} ignored` : ""));
    loadJobs();
  } catch (e) {
    note("#ingest-note", e.message, true);
  }
});

async function loadJobs() {
  try {
    const page = await api("GET", "/v1/jobs?limit=20");
    const rows = [], errors = [];
    for (const job of page.jobs) {
      let eta = "";
      if (job.state === "running" || job.state === "queued") {
        const full = await api("GET", `/v1/jobs/${job.job_id}`);
        eta = full.eta_s == null ? "" : `${Math.round(full.eta_s)} s`;
      }
      if (job.counts.failed) {
        const full = await api("GET", `/v1/jobs/${job.job_id}`);
        for (const e of full.errors.slice(0, 20)) errors.push(`${job.job_id.slice(0, 8)} ${e.filename}: ${e.code}: ${e.message}`);
      }
      const bar = el("div", { class: "bar" }, el("span", { style: `width:${(100 * job.progress).toFixed(1)}%` }));
      rows.push(el("tr", { "data-job": job.job_id, "data-state": job.state },
        el("td", {}, job.job_id.slice(0, 8)), el("td", { class: "job-state" }, job.state), el("td", {}, bar),
        el("td", {}, String(job.counts.done)), el("td", {}, String(job.counts.skipped)),
        el("td", {}, String(job.counts.failed)), el("td", {}, eta),
        el("td", {}, new Date(job.created * 1000).toLocaleString())));
    }
    $("#jobs tbody").replaceChildren(...rows);
    $("#job-errors").replaceChildren(...errors.map((text) => el("p", {}, text)));
  } catch (e) {
    note("#ingest-note", e.message, true);
  }
}

setInterval(() => { if ($("#ingest").classList.contains("active")) loadJobs(); }, 2000);
document.querySelector('button.tab[data-tab="ingest"]').addEventListener("click", loadJobs);
