// The review page: one item at a time, leased to this reviewer by the server.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;   // {item, lease}
let span = null;      // {answer, answer_start} selected in the context

function reviewer() { return $("reviewer").value.trim(); }

function message(text, isError) {
  $("message").textContent = text || "";
  $("message").className = isError ? "error" : "";
}

function showProgress(p) {
  if (!p) return;
  const agreement = p.agreement === null ? "" : ` · agreement with the model ${(100 * p.agreement).toFixed(0)}%`;
  $("progress").textContent = `${p.reviewed} / ${p.total} reviewed${agreement}`;
}

async function call(method, url, body) {
  const response = await fetch(url, {method, headers: {"Content-Type": "application/json"},
                                     body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function renderContext(context, highlight) {
  const box = $("context");
  box.textContent = "";
  if (!highlight) { box.append(document.createTextNode(context)); return; }
  const mark = document.createElement("mark");
  mark.textContent = context.slice(highlight[0], highlight[1]);
  box.append(document.createTextNode(context.slice(0, highlight[0])), mark,
             document.createTextNode(context.slice(highlight[1])));
}

function render(data) {
  showProgress(data.progress);
  $("start").hidden = true;
  current = data.item ? {item: data.item, lease: data.lease} : null;
  $("empty").hidden = current !== null;
  $("item").hidden = current === null;
  span = null;
  $("selected").textContent = "(select the answer in the context with the mouse)";
  $("use-selection").disabled = true;
  $("note").value = "";
  if (!current) return;
  const it = current.item;
  $("title").textContent = it.title || "untitled";
  $("qid").textContent = it.qid;
  $("origin").textContent = [it.run_dir, it.stage].filter(Boolean).join(" · ");
  $("question").textContent = it.question;
  $("model-answer").textContent = it.model_answer === null ? "(not valid JSON)" :
                                  it.model_answer === "?" ? "? (no answer)" : it.model_answer;
  $("na-prob").textContent = it.na_prob.toFixed(3);
  $("accept").disabled = it.model_answer === null;
  renderContext(it.context, it.highlight);
}

async function load() {
  if (!reviewer()) { message("Enter your name first."); return; }
  try { render(await call("GET", `/api/next?reviewer=${encodeURIComponent(reviewer())}`)); message(""); }
  catch (e) { message(e.message, true); }
}

// The selected text and its offset in the context (leading/trailing spaces left out).
function selectedSpan() {
  const selection = window.getSelection();
  if (!selection.rangeCount || selection.isCollapsed) return null;
  const range = selection.getRangeAt(0), box = $("context");
  if (!box.contains(range.startContainer) || !box.contains(range.endContainer)) return null;
  const before = document.createRange();
  before.selectNodeContents(box);
  before.setEnd(range.startContainer, range.startOffset);
  const raw = range.toString(), text = raw.trim();
  if (!text) return null;
  return {answer: text, answer_start: before.toString().length + (raw.length - raw.trimStart().length)};
}

// Set from a selection in the context; a click elsewhere (a button) keeps the last one.
function updateSelection(event) {
  const selected = selectedSpan();
  if (!selected && event && event.type === "selectionchange") return;
  span = selected;
  $("selected").textContent = span ? `"${span.answer}"` : "(select the answer in the context with the mouse)";
  $("use-selection").disabled = !span;
}

async function decide(action) {
  if (!current) return;
  if (action === "span" && !span) { message("Select the answer in the context first.", true); return; }
  const body = {item_id: current.item.item_id, lease: current.lease, reviewer: reviewer(), action,
                note: $("note").value.trim() || null, ...(action === "span" ? span : {})};
  try {
    const result = await call("POST", "/api/decide", body);
    message(`Saved: ${action.replace("_", " ")}${action === "span" ? ` "${span.answer}"` : ""}.`);
    showProgress(result.progress);
    const next = await call("GET", `/api/next?reviewer=${encodeURIComponent(reviewer())}`);
    render(next);
  } catch (e) { message(e.message, true); }
}

async function undo() {
  if (!reviewer()) return;
  try { render(await call("POST", "/api/undo", {reviewer: reviewer()})); message("Undone: the item is back."); }
  catch (e) { message(e.message, true); }
}

$("accept").onclick = () => decide("accept");
$("no-answer").onclick = () => decide("no_answer");
$("use-selection").onclick = () => decide("span");
$("skip").onclick = () => decide("skip");
$("undo").onclick = undo;
$("context").addEventListener("mouseup", updateSelection);
document.addEventListener("selectionchange", updateSelection);
$("reviewer").addEventListener("change", () => { localStorage.setItem("reviewer", reviewer()); load(); });
// Enter in the name field hands the keyboard to the shortcuts.
$("reviewer").addEventListener("keydown", (event) => { if (event.key === "Enter") event.target.blur(); });
document.addEventListener("keydown", (event) => {
  if (["INPUT", "TEXTAREA"].includes(event.target.tagName) || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  const actions = {a: () => decide("accept"), n: () => decide("no_answer"), s: () => decide("span"),
                   k: () => decide("skip"), u: undo};
  if (actions[key]) { event.preventDefault(); actions[key](); }
});
$("reviewer").value = localStorage.getItem("reviewer") || "";
if (reviewer()) load();
