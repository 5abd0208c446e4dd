// The review page: one item at a time, leased to this reviewer by the server; the reviewer is
// whoever the token belongs to (asked once, kept in this browser's localStorage).
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;   // {item, lease} from the queue, or {item, revise: true} from the history
let span = null;      // {answer, answer_start} selected in the context
let busy = false;     // a request is in flight: further presses are ignored (no double decisions)
let me = null;        // {name, admin}
let poll = null;

function token() { return localStorage.getItem("review_token") || ""; }

function message(text, isError) {
  $("message").textContent = text || "";
  $("message").className = isError ? "error" : "";
}

function showProgress(p) {
  if (!p) return;
  const agreement = p.agreement === null ? "" : ` · agreement with the model ${(100 * p.agreement).toFixed(0)}%`;
  const overlap = p.overlap > 1 ? ` (${p.overlap} reviewers each)` : "";
  $("progress").textContent = `${p.reviewed} / ${p.total} reviewed${overlap}${agreement}`;
}

async function call(method, url, body) {
  const headers = {"Authorization": `Bearer ${token()}`};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) { signOut("That token is not valid here: enter yours."); throw new Error("signed out"); }
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

// Offsets between the page and the server count Unicode code points (as Python's str does), not
// JavaScript's UTF-16 units: an emoji before the answer would otherwise shift it by one.
const codePoints = (text) => Array.from(text);

function renderContext(context, highlight) {
  const box = $("context");
  box.textContent = "";
  if (!highlight) { box.append(document.createTextNode(context)); return; }
  const chars = codePoints(context);
  const mark = document.createElement("mark");
  mark.textContent = chars.slice(highlight[0], highlight[1]).join("");
  box.append(document.createTextNode(chars.slice(0, highlight[0]).join("")), mark,
             document.createTextNode(chars.slice(highlight[1]).join("")));
}

function showState(state) {
  for (const id of ["item", "empty", "leased"]) $(id).hidden = id !== state;
  clearTimeout(poll);
  if (state === "leased") poll = setTimeout(load, 10000);
}

function render(data, revise) {
  showProgress(data.progress);
  current = data.item ? {item: data.item, lease: data.lease, revise: Boolean(revise)} : null;
  showState(current ? "item" : data.state === "leased" ? "leased" : "empty");
  span = null;
  $("selected").textContent = "(select the answer in the context with the mouse)";
  $("use-selection").disabled = true;
  $("note").value = "";
  $("revising").hidden = !revise;
  if (!current) return;
  const it = current.item;
  $("title").textContent = it.title || "untitled";
  $("qid").textContent = it.qid;
  $("origin").textContent = [it.run_dir, it.stage].filter(Boolean).join(" · ");
  $("question").textContent = it.question;
  $("model-answer").textContent = it.model_answer === null ? "(not valid JSON)" :
                                  it.model_answer === "?" ? "? (no answer)" : it.model_answer;
  $("raw").hidden = it.model_answer !== null;
  $("raw-output").textContent = it.raw_output;
  $("na-prob").textContent = it.na_prob.toFixed(3);
  $("accept").disabled = it.model_answer === null;
  $("skip").disabled = Boolean(revise);
  renderContext(it.context, it.highlight);
}

async function load() {
  if (!token()) return;
  try { render(await call("GET", "/api/next")); message(""); }
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
  const leading = raw.slice(0, raw.length - raw.trimStart().length);
  return {answer: text, answer_start: codePoints(before.toString()).length + codePoints(leading).length};
}

// Set from a selection in the context; a click elsewhere (a button) keeps the last one.
function updateSelection(event) {
  const selected = selectedSpan();
  if (!selected && event && event.type === "selectionchange") return;
  span = selected;
  $("selected").textContent = span ? `"${span.answer}"` : "(select the answer in the context with the mouse)";
  $("use-selection").disabled = !span;
}

// One request at a time: a second press while the first is on its way does nothing.
async function once(work) {
  if (busy) return;
  busy = true;
  try { await work(); } catch (e) { message(e.message, true); } finally { busy = false; }
}

function decide(action) {
  return once(async () => {
    if (!current) return;
    if (action === "span" && !span) { message("Select the answer in the context first.", true); return; }
    if (current.revise && action === "skip") return;
    const body = {item_id: current.item.item_id, action, note: $("note").value.trim() || null,
                  ...(action === "span" ? span : {})};
    const what = `${action.replace("_", " ")}${action === "span" ? ` "${span.answer}"` : ""}`;
    if (current.revise) {
      const result = await call("POST", "/api/revise", body);
      message(`Revised: ${what}.`);
      showProgress(result.progress);
      loadHistory();
    } else {
      const result = await call("POST", "/api/decide", {...body, lease: current.lease});
      message(`Saved: ${what}.`);
      showProgress(result.progress);
    }
    render(await call("GET", "/api/next"));
  });
}

function undo() {
  return once(async () => { render(await call("POST", "/api/undo", {})); message("Undone: the item is back."); });
}

async function loadHistory() {
  const data = await call("GET", `/api/history?q=${encodeURIComponent($("search").value)}`);
  const list = $("history-list");
  list.textContent = "";
  for (const d of data.decisions) {
    const li = document.createElement("li");
    const answer = d.action === "skip" ? "skipped" : d.answer === "?" ? "no answer" : `"${d.answer}"`;
    li.append(document.createTextNode(`${d.title || "untitled"}: ${d.question} → ${answer} `));
    const button = document.createElement("button");
    button.className = "link";
    button.textContent = "revise";
    button.onclick = () => once(async () => {
      const got = await call("GET", `/api/item?item_id=${d.item_id}`);
      render({item: got.item}, true);
      $("revising-was").textContent = answer;
      window.scrollTo(0, 0);
    });
    li.append(button);
    list.append(li);
  }
}

function cell(row, text) { const td = document.createElement("td"); td.textContent = text; row.append(td); }
const pct = (x) => x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)}%`;

async function loadStats() {
  const s = await call("GET", "/api/stats");
  const body = $("stats-body");
  body.textContent = "";
  const p = document.createElement("p");
  p.textContent = `${s.items} items, ${s.overlap} reviewer(s) each: ${s.agreed} agreed, ${s.disagreement} in ` +
    `disagreement, ${s.resolved} resolved, ${s.pending} pending. Exact agreement ${pct(s.exact_agreement)} over ` +
    `${s.items_with_two_or_more_votes} items with several reviewers; Fleiss' kappa (answer / no answer) ` +
    `${s.fleiss_kappa_has_answer === null ? "–" : s.fleiss_kappa_has_answer.toFixed(2)}.`;
  const table = document.createElement("table");
  const head = table.insertRow();
  for (const h of ["Reviewer", "Decided", "Median seconds", "Agrees with final", "Agrees with model"]) cell(head, h);
  for (const [name, r] of Object.entries(s.reviewers)) {
    const row = table.insertRow();
    cell(row, name); cell(row, r.decided); cell(row, r.median_seconds === null ? "–" : r.median_seconds.toFixed(1));
    cell(row, pct(r.agreement_with_final)); cell(row, pct(r.agreement_with_model));
  }
  body.append(p, table);
}

async function loadDisagreements() {
  const data = await call("GET", "/api/disagreements");
  const box = $("disagreements");
  box.textContent = data.items.length ? "" : "No disagreements.";
  for (const d of data.items) {
    const div = document.createElement("div");
    div.className = "disagreement";
    const q = document.createElement("p");
    q.textContent = `${d.item.title || "untitled"} · ${d.item.qid}: ${d.item.question}`;
    div.append(q);
    for (const v of d.votes) {
      const b = document.createElement("button");
      b.textContent = `${v.reviewer}: ${v.answer === "?" ? "no answer" : `"${v.answer}"`} — use this`;
      b.onclick = () => once(async () => {
        const body = v.answer === "?" ? {item_id: d.item.item_id, action: "no_answer"} :
          {item_id: d.item.item_id, action: "span", answer: v.answer, answer_start: v.answer_start};
        await call("POST", "/api/resolve", body);
        message(`Resolved ${d.item.qid}.`);
        loadDisagreements();
      });
      div.append(b);
    }
    box.append(div);
  }
}

function signOut(text) {
  localStorage.removeItem("review_token");
  me = null;
  $("login").hidden = false;
  $("whoami").textContent = "";
  $("sign-out").hidden = true;
  $("admin").hidden = true;
  showState(null);
  message(text || "");
}

async function signIn() {
  try { me = await call("GET", "/api/me"); } catch (e) { if (me === null && token()) message(e.message, true); return; }
  $("login").hidden = true;
  $("sign-out").hidden = false;
  $("whoami").textContent = `${me.name}${me.admin ? " (admin)" : ""}`;
  $("admin").hidden = !me.admin;
  const g = await call("GET", "/api/guidelines");
  $("guidelines").hidden = !g.text;
  $("guidelines-text").textContent = g.text;
  load();
}

$("login").onsubmit = (event) => {
  event.preventDefault();
  localStorage.setItem("review_token", $("token").value.trim());
  $("token").value = "";
  $("token").blur();  // the keyboard goes to the shortcuts
  signIn();
};
$("sign-out").onclick = () => signOut("Signed out.");
$("accept").onclick = () => decide("accept");
$("no-answer").onclick = () => decide("no_answer");
$("use-selection").onclick = () => decide("span");
$("skip").onclick = () => decide("skip");
$("undo").onclick = undo;
$("cancel-revise").onclick = () => once(async () => render(await call("GET", "/api/next")));
$("history").addEventListener("toggle", () => { if ($("history").open) once(loadHistory); });
$("search").addEventListener("input", () => once(loadHistory));
$("stats").addEventListener("toggle", () => { if ($("stats").open) once(loadStats); });
$("admin").addEventListener("toggle", () => { if ($("admin").open) once(loadDisagreements); });
$("context").addEventListener("mouseup", updateSelection);
document.addEventListener("selectionchange", updateSelection);
document.addEventListener("keydown", (event) => {
  if (["INPUT", "TEXTAREA"].includes(event.target.tagName) || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.repeat) { event.preventDefault(); return; }  // a held key is one press
  const key = event.key.toLowerCase();
  const actions = {a: () => decide("accept"), n: () => decide("no_answer"), s: () => decide("span"),
                   k: () => decide("skip"), u: undo};
  if (actions[key] && !$("item").hidden) { event.preventDefault(); actions[key](); }
});
if (token()) signIn(); else signOut();
