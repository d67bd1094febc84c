// The unlock change report, as a file list for review: auto-exec surfaces first.
//
// ``report`` is the executor's JSON report (``changes_since_lock``, ``auto_exec``
// and one list per kind of change); ``text`` is its rendered form, whose last
// part holds the unified diffs (or one line per binary or large file).

const KINDS = ["added", "modified", "deleted", "mode", "type", "retarget"];

/** Split the rendered report's diff section into {path: diff text}. */
export function splitDiffs(text) {
  const out = new Map();
  const lines = text.split("\n");
  let current = null;
  for (let i = 0; i < lines.length; i++) {
    const l = lines[i];
    const one = l.match(/^(?:Binary|Large) file (.+?) (?:added|modified|deleted) \(/) || l.match(/^File (.+?) could not be read /);
    if (one) {
      out.set(one[1], l);
      current = null;
      continue;
    }
    if (l.startsWith("--- ") && i + 1 < lines.length && lines[i + 1].startsWith("+++ ")) {
      const from = l.slice(4).trim();
      const to = lines[i + 1].slice(4).trim();
      const path = to !== "/dev/null" ? to.replace(/^b\//, "") : from.replace(/^a\//, "");
      current = [l];
      out.set(path, current);
      continue;
    }
    if (current && /^([ +\-@\\]|$)/.test(l)) current.push(l);
    else current = null;
  }
  for (const [k, v] of out) if (Array.isArray(v)) out.set(k, v.join("\n").replace(/\n+$/, ""));
  return out;
}

/** Every changed path: {path, kind, autoExec (reason or ""), diff}; auto-exec surfaces first. */
export function parseUnlockReport(report, text) {
  const diffs = splitDiffs(text);
  const reasons = new Map((report.auto_exec || []).map((a) => [a.path, a.reason]));
  const files = [];
  for (const kind of KINDS) {
    for (const c of report[kind] || []) {
      files.push({ path: c.path, kind, autoExec: reasons.get(c.path) || "", diff: diffs.get(c.path) || "" });
    }
  }
  return files.sort((a, b) => (!!b.autoExec - !!a.autoExec) || a.path.localeCompare(b.path));
}
