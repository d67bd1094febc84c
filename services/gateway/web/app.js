// The devsilo web app: gateways and their sessions, chat, questions, uploads,
// access reports and the unlock review. Plain ES modules, no build step.

import { GatewayConnection, pair, sameOriginUrl } from "./gateway.js";
import { b64decode, b64encode, deleteGateway, listGateways, saveGateway, sha256hex } from "./keys.js";
import { renderMarkdown } from "./markdown.js";
import { parseUnlockReport } from "./review.js";

const $ = (sel, root = document) => root.querySelector(sel);

/** A new element: el("div.cls", {attr}, child, "text", ...) (text always as text nodes). */
function el(spec, attrs = {}, ...children) {
  if (attrs instanceof Node || typeof attrs === "string") {
    children.unshift(attrs);
    attrs = {};
  }
  const [tag, ...classes] = spec.split(".");
  const node = document.createElement(tag);
  if (classes.length) node.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function summarize(input) {
  if (!input || typeof input !== "object") return "";
  const first = input.command ?? input.path ?? input.prompt ?? input.question ?? input.message;
  const text = typeof first === "string" ? first : JSON.stringify(input);
  return text.length > 120 ? `${text.slice(0, 117)}…` : text;
}

const gateways = new Map(); // id -> {record, conn, sessions, el}
const views = new Map(); // "gw|sid" -> SessionView
let active = null;

// -- one session's view --------------------------------------------------------------

class SessionView {
  constructor(gw, sid, summary) {
    this.gw = gw;
    this.sid = sid;
    this.key = `${gw.record.id}|${sid}`;
    this.agents = new Map([["main", "main"]]);
    this.streams = new Map(); // agent -> {el, text}
    this.tools = new Map(); // call id -> {card, out, body}
    this.questions = new Map(); // question id -> card
    this.usd = 0;
    this.tokens = 0;
    this.ended = false;
    this.accessReport = null;
    this.build(summary);
  }

  build(summary) {
    this.busyEl = el("span.busy", { hidden: true, role: "status" }, el("span.spinner"), " working");
    this.costEl = el("span.cost", { title: "cost so far" }, "$0.0000");
    this.stateEl = el("span.chip", {}, summary?.state || "new");
    this.log = el("div.log", { role: "log", "aria-live": "polite" });
    this.questionsEl = el("div.questions");
    this.input = el("textarea", { rows: 2, placeholder: "Message the agent (Enter sends, Shift+Enter: new line)",
      "aria-label": "Prompt" });
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.sendPrompt(); }
    });
    this.fileInput = el("input", { type: "file", hidden: true, onchange: () => this.uploadPicked() });
    this.uploadEl = el("span.upload-status.muted");
    const btn = (label, fn, cls = "", title = "") => el(`button${cls}`, { type: "button", onclick: fn, title }, label);
    this.el = el("section.session", { dataset: { key: this.key }, role: "tabpanel" },
      el("div.session-head",
        el("span.sid", { title: summary?.workspace || "" }, `${this.sid.slice(0, 8)} · ${summary?.workspace || ""}`),
        this.stateEl, this.busyEl, this.costEl),
      el("div.toolbar",
        btn("Access", () => this.showAccess(), ".access-btn", "what the sandbox can reach"),
        btn("Cost", () => this.showCost(), ".cost-btn"),
        btn("Upload", () => this.fileInput.click(), ".upload-btn", "upload a file into the workspace"),
        btn("Interrupt", () => this.interrupt(), ".interrupt-btn", "stop the current turn (Esc)"),
        btn("Stop", () => this.stop(), ".stop-btn danger", "end the session"),
        this.fileInput, this.uploadEl),
      this.log, this.questionsEl,
      el("form.composer", { onsubmit: (e) => { e.preventDefault(); this.sendPrompt(); } },
        this.input, el("button.send", { type: "submit" }, "Send")));
  }

  line(cls, ...children) {
    const node = el(`div.line.${cls}`, {}, ...children);
    const nearBottom = this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 80;
    this.log.append(node);
    if (nearBottom) this.log.scrollTop = this.log.scrollHeight;
    return node;
  }

  agentLabel(agent) {
    if (!agent || agent === "main") return null;
    return el("span.agent-label", { title: agent }, this.agents.get(agent) || agent);
  }

  systemError(message) { this.line("error", message); }

  setBusy(busy) {
    this.busyEl.hidden = !busy;
    this.stateEl.textContent = this.ended ? "ended" : busy ? "busy" : "idle";
    this.gw.refreshState(this.sid, this.stateEl.textContent);
  }

  onEvent(ev) {
    const d = ev.data || {};
    const sub = ev.agent && ev.agent !== "main" ? " sub" : "";
    switch (ev.kind) {
      case "session_started":
        this.line("system", `session started · ${d.sandbox} sandbox on ${d.executor} · model ${d.model}`);
        break;
      case "user_prompt":
        this.line("prompt", el("span.who", {}, String(d.client || "session prompt")), el("div.text", {}, String(d.text ?? "")));
        break;
      case "assistant_text": {
        let s = this.streams.get(ev.agent);
        if (!s) {
          const body = el("div.body");
          s = { node: this.line(`assistant${sub}`, this.agentLabel(ev.agent), body), body, text: "" };
          this.streams.set(ev.agent, s);
        }
        s.text = d.final ? String(d.text ?? "") : s.text + String(d.text ?? "");
        s.body.replaceChildren(renderMarkdown(s.text));
        if (d.final) this.streams.delete(ev.agent);
        break;
      }
      case "tool_use": {
        this.streams.delete(ev.agent);
        const out = el("pre.tool-out");
        const state = el("span.tool-state", {}, el("span.spinner"));
        const details = el("details.tool", { dataset: { call: d.id } },
          el("summary", {}, state, this.agentLabel(ev.agent), el("b", {}, d.name), " ", el("span.muted", {}, summarize(d.input))),
          el("pre.tool-input", {}, JSON.stringify(d.input, null, 2)), out);
        this.line(`tool-line${sub}`, details);
        this.tools.set(d.id, { details, out, state, streamed: false });
        break;
      }
      case "tool_output": {
        const t = this.tools.get(d.id);
        if (!t) break;
        t.streamed = true;
        t.out.append(el(`span.${d.stream === "stderr" ? "stderr" : "stdout"}`, {}, String(d.data ?? "")));
        break;
      }
      case "tool_result": {
        const t = this.tools.get(d.id);
        if (!t) { this.line(d.is_error ? "error" : "system", `${d.name}: ${d.content}`); break; }
        t.state.replaceChildren(d.is_error ? "✗" : "✓");
        t.details.classList.toggle("failed", !!d.is_error);
        if (!t.streamed || d.is_error) t.out.append(el(`span.${d.is_error ? "stderr" : "result"}`, {}, String(d.content ?? "")));
        break;
      }
      case "agent_spawned":
        this.agents.set(d.id, d.name || d.id);
        this.line("system sub", this.agentLabel(d.id), ` subagent started: ${d.prompt || ""}`);
        break;
      case "agent_completed":
        this.line(`system sub${d.status === "failed" ? " error" : ""}`, this.agentLabel(ev.agent || d.id),
          ` subagent ${d.status}${d.text ? `: ${d.text}` : ""}`);
        break;
      case "question_asked":
        this.ask(ev, d);
        break;
      case "question_answered": {
        this.questions.get(d.id)?.remove();
        this.questions.delete(d.id);
        const what = d.cancelled ? "question cancelled"
          : `answered by ${d.client}: ${[...(d.selected || []), d.text].filter(Boolean).join(", ")}`;
        this.line("system answered", what);
        break;
      }
      case "file_shared":
        this.fileShared(d);
        break;
      case "cost":
        this.usd += Number(d.usd || 0);
        this.tokens += Number(d.input_tokens || 0) + Number(d.output_tokens || 0);
        this.costEl.textContent = `$${this.usd.toFixed(4)}`;
        this.costEl.title = `${this.tokens} tokens`;
        break;
      case "busy":
        this.setBusy(!!d.busy);
        break;
      case "turn_complete":
      case "awaiting_input":
        this.setBusy(false);
        break;
      case "interrupted":
        this.line("system", `interrupted (${d.reason || "by a user"})`);
        break;
      case "access_report":
        this.accessReport = d;
        break;
      case "error":
        this.line("error", d.message || "error");
        break;
      case "shutdown":
        this.ended = true;
        this.setBusy(false);
        this.line(d.exit_code ? "error" : "system", `session ended (exit code ${d.exit_code}): ${d.reason || ""}`);
        this.input.disabled = true;
        for (const q of this.questions.values()) q.remove();
        this.questions.clear();
        break;
      default:
        this.line("system", `${ev.kind}`);
    }
  }

  ask(ev, d) {
    const multi = !!d.multi_select;
    const name = `q-${this.sid}-${d.id}`;
    const choices = (d.options || []).map((o) => el("label.option", {},
      el("input", { type: multi ? "checkbox" : "radio", name, value: o.label }),
      el("span", {}, o.label), o.description ? el("small.muted", {}, o.description) : null));
    const free = d.allow_free_text ? el("textarea.free", { rows: 2, placeholder: "Your own answer", "aria-label": "Your own answer" }) : null;
    const err = el("p.error", { role: "alert" });
    const card = el("form.question", { dataset: { question: d.id } },
      el("div.q-head", {}, this.agentLabel(ev.agent), el("b", {}, "Question")),
      el("div.q-text", {}, renderMarkdown(d.question || "")), ...choices, free, err,
      el("button.answer", { type: "submit" }, "Answer"));
    card.addEventListener("submit", async (e) => {
      e.preventDefault();
      const selected = [...card.querySelectorAll("input:checked")].map((i) => i.value);
      const text = free && free.value.trim() ? free.value.trim() : null;
      if (!selected.length && !text) { err.textContent = "pick an option or write an answer"; return; }
      try {
        this.gw.conn.send({ type: "answer_question", session_id: this.sid, question_id: d.id, selected, text });
        card.querySelector("button.answer").disabled = true;
      } catch (x) {
        err.textContent = x.message;
      }
    });
    this.questions.set(d.id, card);
    this.questionsEl.append(card);
  }

  fileShared(d) {
    const who = d.direction === "upload" ? `${d.client || "someone"} uploaded` : "the agent shared";
    const parts = [`${who} ${d.path} (${formatBytes(d.size)}, sha256 ${String(d.sha256).slice(0, 12)}…)`];
    if (d.direction === "download" && d.data) {
      const url = URL.createObjectURL(new Blob([b64decode(d.data)]));
      parts.push(" ", el("a", { href: url, download: d.path.split("/").pop() }, "download"));
    }
    if (d.caption) parts.push(el("div.muted", {}, d.caption));
    this.line("file", ...parts);
  }

  onGatewayError(frame) {
    if (frame.code === "question_closed") {
      this.line("error closed", frame.message);
      return;
    }
    this.line("error", `${frame.request ? `${frame.request}: ` : ""}${frame.message}`);
  }

  sendPrompt() {
    const text = this.input.value.trim();
    if (!text) return;
    try {
      this.gw.conn.send({ type: "prompt", session_id: this.sid, text });
      this.input.value = "";
    } catch (err) {
      this.systemError(err.message);
    }
  }

  interrupt() {
    try { this.gw.conn.send({ type: "interrupt", session_id: this.sid }); } catch (err) { this.systemError(err.message); }
  }

  stop() {
    if (!confirm(`Stop session ${this.sid}? Its agent ends and its sandbox closes.`)) return;
    try { this.gw.conn.send({ type: "shutdown", session_id: this.sid }); } catch (err) { this.systemError(err.message); }
  }

  async showAccess() {
    try {
      const r = await this.gw.conn.call({ type: "access_report", session_id: this.sid });
      showReport(`Access report · ${this.sid.slice(0, 8)}`, accessView(r.report));
    } catch (err) {
      this.systemError(`access report: ${err.message}`);
    }
  }

  async showCost() {
    try {
      const r = await this.gw.conn.call({ type: "cost", session_id: this.sid });
      const rows = Object.entries(r.totals).map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, String(v))));
      const models = Object.entries(r.by_model).map(([m, t]) => el("tr", {}, el("th", {}, m), el("td", {}, `$${(t.usd || 0).toFixed(4)}`)));
      showReport(`Cost · ${this.sid.slice(0, 8)}`, el("div", {}, el("table.kv", {}, ...rows),
        el("h4", {}, "By model"), el("table.kv", {}, ...models)));
    } catch (err) {
      this.systemError(`cost: ${err.message}`);
    }
  }

  async uploadPicked() {
    const file = this.fileInput.files[0];
    this.fileInput.value = "";
    if (!file) return;
    const path = file.name;
    try {
      await uploadFile(this.gw.conn, this.sid, path, new Uint8Array(await file.arrayBuffer()),
        (sent, size) => { this.uploadEl.textContent = `uploading ${path}: ${Math.floor((100 * sent) / Math.max(size, 1))}%`; });
      this.uploadEl.textContent = `uploaded ${path}`;
    } catch (err) {
      this.uploadEl.textContent = "";
      this.systemError(`upload of ${path} failed: ${err.message}`);
    }
  }
}

let uploadCounter = 0;

/** Upload bytes in chunks (binary safe: base64 per chunk), the whole file's SHA-256 checked by the gateway. */
async function uploadFile(conn, sid, path, bytes, progress) {
  const sha256 = await sha256hex(bytes);
  const uploadId = `web${Date.now().toString(36)}${(uploadCounter++).toString(36)}`;
  const ready = await conn.call({ type: "upload_file", session_id: sid, upload_id: uploadId, path, size: bytes.length, sha256 });
  const size = Math.max(1, ready.chunk_size);
  let offset = 0;
  let last = null;
  do {
    const chunk = bytes.subarray(offset, offset + size);
    last = await conn.call({ type: "upload_chunk", upload_id: uploadId, offset, data: b64encode(chunk) });
    offset += chunk.length;
    progress(offset, bytes.length);
  } while (offset < bytes.length);
  if (last.type !== "upload_done") throw new Error("the gateway did not confirm the upload");
  return last;
}

function accessView(report) {
  const box = el("div.access");
  for (const [k, v] of Object.entries(report || {})) {
    const value = Array.isArray(v) ? (v.length ? el("ul", {}, ...v.map((x) => el("li", {}, typeof x === "string" ? x : JSON.stringify(x)))) : el("span.muted", {}, "none"))
      : typeof v === "object" && v !== null ? el("pre", {}, JSON.stringify(v, null, 2)) : el("span", {}, String(v));
    box.append(el("div.kv-row", {}, el("b", {}, k.replaceAll("_", " ")), value));
  }
  return box;
}

function showReport(title, body) {
  $("#report-title").textContent = title;
  $("#report-body").replaceChildren(body);
  const dlg = $("#report-dialog");
  if (!dlg.open) dlg.showModal();
}

// -- the unlock review ---------------------------------------------------------------

function unlockReview(result) {
  const files = parseUnlockReport(result.report || {}, result.report_text || "");
  const diffView = el("div.diff", { "aria-label": "diff" });
  const show = (f, item) => {
    for (const n of list.querySelectorAll(".selected")) n.classList.remove("selected");
    item.classList.add("selected");
    diffView.replaceChildren(...diffLines(f.diff || `(no content diff: ${f.kind})`));
  };
  const list = el("ul.files");
  files.forEach((f, i) => {
    const item = el("li", { tabindex: 0, class: f.autoExec ? "autoexec" : "", dataset: { path: f.path } },
      el("span.kind", { class: `kind ${f.kind}` }, f.kind), el("span.path", {}, f.path),
      f.autoExec ? el("div.warn", {}, `⚠ auto-exec: ${f.autoExec}`) : null);
    item.addEventListener("click", () => show(f, item));
    item.addEventListener("keydown", (e) => { if (e.key === "Enter") show(f, item); });
    list.append(item);
    if (i === 0) queueMicrotask(() => show(f, item));
  });
  const warnings = files.filter((f) => f.autoExec).length;
  return el("div.review", {},
    warnings ? el("p.banner.error", {}, `⚠ ${warnings} auto-exec surface(s) changed: review them before you open, build or commit this project.`) : null,
    el("p", {}, `Changes since lock: ${result.report?.changes_since_lock ?? files.length}`),
    el("div.review-split", {}, list, diffView));
}

function diffLines(text) {
  return text.split("\n").map((l) => {
    let cls = "ctx";
    if (l.startsWith("+++") || l.startsWith("---")) cls = "hdr";
    else if (l.startsWith("@@")) cls = "hunk";
    else if (l.startsWith("+")) cls = "add";
    else if (l.startsWith("-")) cls = "del";
    return el(`div.dl.${cls}`, {}, l || " ");
  });
}

// -- gateways ------------------------------------------------------------------------

class GatewayEntry {
  constructor(record) {
    this.record = record;
    this.conn = new GatewayConnection(record);
    this.sessions = [];
    this.statusEl = el("span.gw-status.offline", {}, "offline");
    this.listEl = el("ul.sessions");
    this.el = el("section.gateway", { dataset: { gateway: record.id } },
      el("div.gw-head", {}, el("b", { title: record.url }, shortUrl(record.url)), this.statusEl),
      el("div.gw-who.muted", {}, `${record.user}${record.operator ? " (operator)" : ""} · ${record.clientName} · ${record.keyType}`),
      el("div.gw-actions", {},
        el("button.new-session", { type: "button", onclick: () => newSessionDialog(this) }, "New session"),
        el("button", { type: "button", onclick: () => workspaceDialog(this) }, "Workspace"),
        el("button", { type: "button", onclick: () => this.refresh() }, "↻"),
        el("button.danger", { type: "button", onclick: () => this.forget(), title: "forget this gateway and its key" }, "Forget")),
      this.listEl);
    this.conn.addEventListener("state", (e) => this.onState(e.detail));
    this.conn.addEventListener("event", (e) => views.get(`${record.id}|${e.detail.session_id}`)?.onEvent(e.detail));
    this.conn.addEventListener("frame", (e) => this.onFrame(e.detail));
  }

  onState({ state, message }) {
    this.statusEl.className = `gw-status ${state}`;
    this.statusEl.textContent = state;
    this.statusEl.title = message;
    if (state === "online") this.refresh();
    if (state === "refused") this.listEl.replaceChildren(el("li.error", {}, message));
  }

  onFrame(frame) {
    if (frame.type === "error") {
      const view = active && views.get(active);
      if (view && view.gw === this) view.onGatewayError(frame);
      else topStatus(frame.message, true);
    } else if (frame.type === "auth_error") {
      topStatus(`${shortUrl(this.record.url)}: ${frame.message}`, true);
    } else if (frame.type === "overloaded") {
      topStatus(`gateway busy: ${frame.message}`, true);
    }
  }

  async refresh() {
    try {
      const r = await this.conn.call({ type: "list_sessions" });
      this.sessions = [...r.sessions].sort((a, b) => b.created_at - a.created_at);
    } catch (err) {
      topStatus(err.message, true);
      return;
    }
    this.listEl.replaceChildren(...this.sessions.map((s) => el("li", { dataset: { session: s.session_id } },
      el("button.session-link", { type: "button", onclick: () => openSession(this, s) },
        el("span.state", { class: `state ${s.state}` }, s.state), " ", s.session_id.slice(0, 8), " ",
        el("span.muted", {}, s.workspace.split("/").pop() || s.workspace)))));
  }

  refreshState(sid, state) {
    const node = this.listEl.querySelector(`li[data-session="${CSS.escape(sid)}"] .state`);
    if (node) { node.textContent = state; node.className = `state ${state}`; }
  }

  async forget() {
    if (!confirm(`Forget ${this.record.url}? Its key is deleted from this browser.`)) return;
    this.conn.close();
    for (const v of [...views.values()].filter((x) => x.gw === this)) closeView(v.key);
    await deleteGateway(this.record.id);
    gateways.delete(this.record.id);
    this.el.remove();
  }
}

function shortUrl(url) {
  try { return new URL(url).host; } catch { return url; }
}

function topStatus(message, isError = false) {
  const s = $("#top-status");
  s.textContent = message;
  s.className = isError ? "error" : "muted";
}

function addGateway(record) {
  const entry = new GatewayEntry(record);
  gateways.set(record.id, entry);
  $("#gateways").append(entry.el);
  entry.conn.start();
  return entry;
}

// -- tabs -----------------------------------------------------------------------------

function openSession(gw, summary) {
  const key = `${gw.record.id}|${summary.session_id}`;
  let view = views.get(key);
  if (!view) {
    view = new SessionView(gw, summary.session_id, summary);
    views.set(key, view);
    view.tab = el("div.tab", { role: "tab", dataset: { key } },
      el("button.tab-name", { type: "button", onclick: () => activate(key) }, summary.session_id.slice(0, 8)),
      el("button.tab-close", { type: "button", "aria-label": "Close tab", onclick: () => closeView(key) }, "×"));
    $("#tabs").append(view.tab);
    $("#views").append(view.el);
    gw.conn.attach(summary.session_id, 0);
  }
  activate(key);
  document.body.classList.remove("side-open");
}

function activate(key) {
  active = key;
  $("#welcome").hidden = true;
  for (const v of views.values()) {
    v.el.hidden = v.key !== key;
    v.tab.classList.toggle("active", v.key === key);
    v.tab.setAttribute("aria-selected", String(v.key === key));
  }
}

function closeView(key) {
  const v = views.get(key);
  if (!v) return;
  v.gw.conn.follow.delete(v.sid);
  v.el.remove();
  v.tab.remove();
  views.delete(key);
  const next = [...views.keys()].pop();
  if (next) activate(next); else { active = null; $("#welcome").hidden = false; }
}

// -- dialogs ----------------------------------------------------------------------------

function newSessionDialog(gw) {
  const dlg = $("#new-dialog");
  const form = $("#new-form");
  const err = $(".error", form);
  err.textContent = "";
  form.onsubmit = async (e) => {
    e.preventDefault();
    const f = new FormData(form);
    const frame = { type: "create_session", workspace: f.get("workspace").trim(), sandbox: f.get("sandbox"),
      llm: f.get("llm"), model: f.get("model").trim() || "mock" };
    if (f.get("script").trim()) frame.script = f.get("script");
    if (f.get("prompt").trim()) frame.prompt = f.get("prompt");
    err.textContent = "starting…";
    try {
      const created = await gw.conn.call(frame);
      dlg.close();
      openSession(gw, { session_id: created.session_id, workspace: frame.workspace, state: "new" });
      gw.refresh();
    } catch (x) {
      err.textContent = x.message;
    }
  };
  dlg.showModal();
}

function workspaceDialog(gw) {
  const dlg = $("#ws-dialog");
  const form = $("#ws-form");
  const err = $(".error", form);
  err.textContent = "";
  for (const b of form.querySelectorAll("button[data-op]")) {
    b.onclick = async () => {
      const path = form.elements.path.value.trim();
      if (!path) return;
      err.textContent = `${b.dataset.op}ing…`;
      try {
        const r = await gw.conn.call({ type: "workspace", op: b.dataset.op, path });
        if (r.type === "workspace_upload_needed") { err.textContent = r.reason; return; }
        err.textContent = "";
        dlg.close();
        if (b.dataset.op === "unlock") showReport(`Unlock review · ${path}`, unlockReview(r));
        else topStatus(`${path} locked`);
      } catch (x) {
        err.textContent = x.message;
      }
    };
  }
  dlg.showModal();
}

function pairDialog() {
  const dlg = $("#pair-dialog");
  const form = $("#pair-form");
  $("#pair-error").textContent = "";
  if (!form.elements.url.value) form.elements.url.value = sameOriginUrl();
  if (!form.elements.name.value) form.elements.name.value = `web-${navigator.platform || "browser"}`.slice(0, 64);
  form.onsubmit = async (e) => {
    e.preventDefault();
    const url = form.elements.url.value.trim();
    $("#pair-error").textContent = "pairing…";
    $("#pair-submit").disabled = true;
    try {
      const record = await pair(url, form.elements.code.value, form.elements.name.value.trim());
      if (gateways.has(record.id)) { gateways.get(record.id).conn.close(); gateways.get(record.id).el.remove(); }
      await saveGateway(record);
      form.elements.code.value = "";
      dlg.close();
      addGateway(record);
    } catch (err) {
      $("#pair-error").textContent = err.message;
    } finally {
      $("#pair-submit").disabled = false;
    }
  };
  dlg.showModal();
}

// -- start -----------------------------------------------------------------------------

async function main() {
  for (const dlg of document.querySelectorAll("dialog")) {
    for (const b of dlg.querySelectorAll("[data-close]")) b.addEventListener("click", () => dlg.close());
  }
  $("#add-gateway").addEventListener("click", pairDialog);
  $("#menu").addEventListener("click", () => document.body.classList.toggle("side-open"));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && active && !document.querySelector("dialog[open]")) views.get(active)?.interrupt();
  });
  if (!window.isSecureContext || !crypto.subtle) {
    topStatus("this page needs HTTPS (a secure context) for its keys", true);
    return;
  }
  const known = await listGateways();
  for (const record of known) addGateway(record);
  if (!known.length) pairDialog();
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("sw.js", { scope: "./" }).catch((err) => {
      console.info(`offline shell unavailable: ${err.message}`);
    });
  }
  document.body.dataset.ready = "1";
}

main().catch((err) => topStatus(err.message, true));
