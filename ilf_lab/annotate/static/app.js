// ILF annotate: one page, no framework. Every piece of task or program text is untrusted and goes into
// the DOM through textContent / .value only (never innerHTML); the server's CSP forbids inline script too.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { summary: null, i: null, data: null, maxDist: 0.5 };

// ---------------------------------------------------------------- helpers

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const res = await fetch(path, opts);
  let data;
  try { data = await res.json(); } catch (e) { data = { error: `${res.status} ${res.statusText}` }; }
  if (!res.ok) throw new Error(data.error || `${res.status} ${res.statusText}`);
  return data;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function setStatus(msg, isError) {
  $("status").textContent = msg;
  $("status").classList.toggle("error", !!isError);
}

function levenshtein(a, b) {
  a = Array.from(a); b = Array.from(b);  // code points, like Python's str
  let s = 0;
  while (s < a.length && s < b.length && a[s] === b[s]) s++;
  let e = 0;
  while (e < a.length - s && e < b.length - s && a[a.length - 1 - e] === b[b.length - 1 - e]) e++;
  a = a.slice(s, a.length - e); b = b.slice(s, b.length - e);
  if (a.length < b.length) [a, b] = [b, a];
  if (!b.length) return a.length;
  let prev = Array.from({ length: b.length + 1 }, (_, k) => k);
  for (let x = 1; x <= a.length; x++) {
    const cur = [x];
    for (let y = 1; y <= b.length; y++) {
      cur.push(Math.min(prev[y] + 1, cur[y - 1] + 1, prev[y - 1] + (a[x - 1] === b[y - 1] ? 0 : 1)));
    }
    prev = cur;
  }
  return prev[b.length];
}

// the paper's measure: on the text after the docstring prompt, normalised by the original's length
function editDistance(original, refinement, prompt) {
  let a = original, b = refinement;
  if (prompt && a.startsWith(prompt) && b.startsWith(prompt)) {
    a = a.slice(prompt.length); b = b.slice(prompt.length);
  }
  const n = Array.from(a).length;
  if (!n) return b.length ? 1 : 0;
  return levenshtein(a, b) / n;
}

function draftKey() {
  return `ilf-annotate:${state.summary.out}:${state.data.item.task_id}`;
}

function saveDraft() {
  if (!state.data) return;
  try {
    localStorage.setItem(draftKey(), JSON.stringify({ feedback: $("feedback").value, program: $("refinement").value }));
  } catch (e) { /* storage full or disabled: drafts are a convenience */ }
}

// ---------------------------------------------------------------- rendering

function renderProgress() {
  const s = state.summary;
  $("progress").textContent = `${s.done} of ${s.n} done`;
  $("progress-bar").max = Math.max(1, s.n);
  $("progress-bar").value = s.done;
  const jump = $("jump");
  jump.replaceChildren();
  for (const it of s.items) {
    const opt = el("option", null, `${it.i + 1}. task ${it.task_id}${it.done ? (it.passed ? " ✓" : " ✗") : ""}`);
    opt.value = String(it.i);
    jump.appendChild(opt);
  }
  if (state.i !== null) jump.value = String(state.i);
  $("prev").disabled = state.i === null || state.i <= 0;
  $("next").disabled = state.i === null || state.i >= s.n - 1;
}

function renderTests(ul, results) {
  ul.replaceChildren();
  for (const r of results || []) {
    const li = el("li", r.passed ? "pass" : "fail", r.test);
    if (!r.passed) li.appendChild(el("span", "why", `  → ${r.result}`));
    ul.appendChild(li);
  }
}

function renderDistance() {
  if (!state.data) return;
  const it = state.data.item;
  const d = editDistance(it.program, $("refinement").value, it.prompt);
  const box = $("distance");
  const pct = (100 * d).toFixed(1);
  const over = d >= state.maxDist;
  box.textContent = `Edit distance vs the original: ${pct}%` + (over
    ? ` — over the paper's ${100 * state.maxDist}% rule: ILF drops refinements this far from the model's program`
    : ` (the paper keeps refinements under ${100 * state.maxDist}%)`);
  box.classList.toggle("over", over);
}

function renderVerdict(v) {
  const box = $("verdict");
  box.hidden = false;
  box.classList.toggle("passed", v.passed);
  box.classList.toggle("failed", !v.passed);
  $("verdict-head").textContent = v.passed
    ? `Passed all ${v.tests.length} tests (${v.seconds}s)`
    : `Failed: ${v.result}`;
  renderTests($("verdict-tests"), v.tests);
  $("verdict-out").textContent = v.stdout || "";
  $("verdict-out").hidden = !v.stdout;
}

function render() {
  const { item, saved } = state.data;
  $("task-id").textContent = `${item.task_id}`;
  $("item-state").textContent = saved ? (saved.passed ? "saved · passes" : "saved · fails") : "not done";
  $("item-state").classList.toggle("done", !!saved);
  $("task-text").textContent = item.text;
  $("tests").textContent = (item.tests || []).join("\n");
  $("program").textContent = item.program;
  $("failure").textContent = item.result + (item.stdout ? `\n${item.stdout}` : "");
  renderTests($("failure-tests"), item.test_results);
  let feedback = saved ? saved.Feedback : "";
  let program = saved ? saved.unedited_annotator_completion : item.program;
  let note = saved ? `saved by ${saved.worker_id || "?"}` : "";
  try {
    const draft = JSON.parse(localStorage.getItem(draftKey()) || "null");
    if (draft && (draft.feedback !== feedback || draft.program !== program)) {
      feedback = draft.feedback; program = draft.program; note = "unsaved draft restored";
    }
  } catch (e) { /* a broken draft is ignored */ }
  $("feedback").value = feedback;
  $("refinement").value = program;
  $("verdict").hidden = true;
  setStatus(note);
  renderDistance();
  renderProgress();
}

// ---------------------------------------------------------------- actions

async function load(i) {
  setStatus("loading…");
  try {
    state.data = await api(`/api/item/${i}`);
    state.i = i;
    history.replaceState(null, "", `#item=${i + 1}`);
    render();
  } catch (e) {
    setStatus(`could not load item ${i + 1}: ${e.message}`, true);
  }
}

function busy(on) {
  for (const id of ["run", "save", "prev", "next", "jump"]) $(id).disabled = on;
  if (!on) renderProgress();
}

async function runTests() {
  if (!state.data) return;
  busy(true);
  setStatus("running the tests…");
  try {
    const v = await api("/api/run", { i: state.i, program: $("refinement").value });
    renderVerdict(v);
    setStatus("");
  } catch (e) {
    setStatus(`run failed: ${e.message}`, true);
  } finally {
    busy(false);
  }
}

async function saveAndNext() {
  if (!state.data) return;
  const annotator = $("annotator").value.trim();
  if (!annotator) { setStatus("set an annotator id (top right) first", true); $("annotator").focus(); return; }
  if (!$("feedback").value.trim()) { setStatus("write some feedback first", true); $("feedback").focus(); return; }
  busy(true);
  setStatus("running the tests and saving…");
  try {
    const r = await api("/api/save", {
      i: state.i, feedback: $("feedback").value, program: $("refinement").value, annotator,
    });
    try { localStorage.removeItem(draftKey()); } catch (e) { /* ignore */ }
    state.summary = await api("/api/items");
    state.data.saved = r.record;
    renderVerdict(r.verdict);
    $("item-state").textContent = r.record.passed ? "saved · passes" : "saved · fails";
    $("item-state").classList.add("done");
    busy(false);
    if (!r.record.passed) {
      setStatus("Saved, but the refinement fails its tests: ILF keeps only passing refinements.", true);
      return;
    }
    const items = state.summary.items;
    const after = items.slice(state.i + 1).concat(items.slice(0, state.i)).find((it) => !it.done);
    if (after) {
      await load(after.i);
      setStatus(`saved task ${r.record.task_id}`);
    } else {
      setStatus(`Saved. All ${state.summary.n} items are done — annotations are in ${state.summary.out}`);
    }
  } catch (e) {
    busy(false);
    setStatus(`save failed: ${e.message}`, true);
  }
}

// ---------------------------------------------------------------- wiring

async function init() {
  try {
    state.summary = await api("/api/items");
  } catch (e) {
    setStatus(`cannot reach the server: ${e.message}`, true);
    return;
  }
  state.maxDist = state.summary.max_edit_distance;
  $("annotator").value = localStorage.getItem("ilf-annotate:annotator") || state.summary.annotator || "";
  $("annotator").addEventListener("change", () => localStorage.setItem("ilf-annotate:annotator", $("annotator").value.trim()));
  $("feedback").addEventListener("input", saveDraft);
  $("refinement").addEventListener("input", () => { saveDraft(); renderDistance(); });
  $("refinement").addEventListener("keydown", (ev) => {
    if (ev.key === "Tab" && !ev.shiftKey && !ev.ctrlKey && !ev.altKey) {
      ev.preventDefault();
      const t = ev.target;
      t.setRangeText("    ", t.selectionStart, t.selectionEnd, "end");
      saveDraft(); renderDistance();
    }
  });
  $("run").addEventListener("click", runTests);
  $("save").addEventListener("click", saveAndNext);
  $("reset").addEventListener("click", () => {
    $("refinement").value = state.data.item.program; saveDraft(); renderDistance();
  });
  $("prev").addEventListener("click", () => load(state.i - 1));
  $("next").addEventListener("click", () => load(state.i + 1));
  $("jump").addEventListener("change", (ev) => load(Number(ev.target.value)));
  document.addEventListener("keydown", (ev) => {
    if ((ev.ctrlKey || ev.metaKey) && ev.key === "Enter") { ev.preventDefault(); runTests(); }
    if ((ev.ctrlKey || ev.metaKey) && ev.key.toLowerCase() === "s") { ev.preventDefault(); saveAndNext(); }
  });
  const m = /item=(\d+)/.exec(location.hash);
  const fromHash = m ? Number(m[1]) - 1 : NaN;
  const start = fromHash >= 0 && fromHash < state.summary.n ? fromHash : (state.summary.next ?? 0);
  if (state.summary.next === null && !m) setStatus(`All ${state.summary.n} items are done.`);
  await load(start);
}

document.addEventListener("DOMContentLoaded", init);
