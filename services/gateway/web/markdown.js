// A small, careful Markdown renderer: it builds DOM nodes with textContent,
// never innerHTML, so model output cannot inject markup or script.
// Handles fenced code, headings, lists, quotes, paragraphs, inline code,
// bold, italic and http(s) links; everything else shows as text.

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*)|(\[[^\]\n]+\]\([^)\s]+\))/g;

function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    const tok = m[0];
    let node;
    if (m[1]) {
      node = document.createElement("code");
      node.textContent = tok.slice(1, -1);
    } else if (m[2]) {
      node = document.createElement("strong");
      inline(node, tok.slice(2, -2));
    } else if (m[3]) {
      node = document.createElement("em");
      inline(node, tok.slice(1, -1));
    } else {
      const close = tok.indexOf("](");
      const label = tok.slice(1, close);
      const href = tok.slice(close + 2, -1);
      if (/^https?:\/\//i.test(href)) {
        node = document.createElement("a");
        node.href = href;
        node.rel = "noopener noreferrer";
        node.target = "_blank";
        node.textContent = label;
      } else {
        node = document.createTextNode(tok);
      }
    }
    parent.append(node);
    last = m.index + tok.length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

/** Render Markdown ``text`` into a new element (a div of blocks). */
export function renderMarkdown(text) {
  const root = document.createElement("div");
  root.className = "md";
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+-]*)/);
    if (fence) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      if (fence[2]) code.dataset.lang = fence[2];
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++;
      code.textContent = body.join("\n");
      pre.append(code);
      root.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = document.createElement(`h${Math.min(heading[1].length + 2, 6)}`);
      inline(h, heading[2]);
      root.append(h);
      i++;
      continue;
    }
    const item = /^\s*([-*+]|\d+[.)])\s+/;
    if (item.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = document.createElement(ordered ? "ol" : "ul");
      while (i < lines.length && item.test(lines[i])) {
        const li = document.createElement("li");
        inline(li, lines[i].replace(item, ""));
        list.append(li);
        i++;
      }
      root.append(list);
      continue;
    }
    if (/^\s*>/.test(line)) {
      const q = document.createElement("blockquote");
      const body = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) body.push(lines[i++].replace(/^\s*>\s?/, ""));
      inline(q, body.join(" "));
      root.append(q);
      continue;
    }
    if (!line.trim()) {
      i++;
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && !/^\s*(```|~~~|#{1,6}\s|[-*+]\s|\d+[.)]\s|>)/.test(lines[i])) {
      para.push(lines[i++]);
    }
    if (!para.length) para.push(lines[i++]);
    const p = document.createElement("p");
    inline(p, para.join("\n"));
    root.append(p);
  }
  return root;
}
