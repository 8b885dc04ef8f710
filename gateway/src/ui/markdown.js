// A small Markdown renderer for chat answers: fenced and inline code, headings, lists, quotes,
// bold, italics, links and paragraphs. It builds DOM nodes (never HTML strings), so model output
// can never inject markup, and it tolerates the half-finished text of a stream (an open fence is
// code up to the end).
"use strict";

(function () {
  function inline(text, parent) {
    // Code spans first: nothing inside them is formatted.
    const pattern = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\*\*([^*]+)\*\*|__([^_]+)__|\*([^*\s][^*]*)\*|_([^_\s][^_]*)_|\[([^\]]+)\]\((https?:\/\/[^)\s]+)\)/g;
    let last = 0;
    for (const m of text.matchAll(pattern)) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      let node;
      if (m[1]) {
        node = document.createElement("code");
        node.textContent = m[2];
      } else if (m[3] !== undefined || m[4] !== undefined) {
        node = document.createElement("strong");
        inline(m[3] ?? m[4], node);
      } else if (m[5] !== undefined || m[6] !== undefined) {
        node = document.createElement("em");
        inline(m[5] ?? m[6], node);
      } else {
        node = document.createElement("a");
        node.href = m[8];
        node.rel = "noopener noreferrer";
        node.target = "_blank";
        node.textContent = m[7];
      }
      parent.append(node);
      last = m.index + m[0].length;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  function paragraph(lines, parent) {
    if (!lines.length) return;
    const p = document.createElement("p");
    lines.forEach((line, i) => {
      if (i) p.append(document.createElement("br"));
      inline(line, p);
    });
    parent.append(p);
  }

  function render(text) {
    const root = document.createDocumentFragment();
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let para = [];
    let list = null;
    const flush = () => {
      paragraph(para, root);
      para = [];
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(```|~~~)\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flush();
        list = null;
        const body = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        if (fence[2]) code.dataset.lang = fence[2];
        code.textContent = body.join("\n");
        pre.append(code);
        root.append(pre);
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
      const quote = line.match(/^>\s?(.*)$/);
      if (heading) {
        flush();
        list = null;
        // Answers sit under the page's own headings: start at h3.
        const h = document.createElement("h" + Math.min(6, heading[1].length + 2));
        inline(heading[2], h);
        root.append(h);
      } else if (bullet) {
        flush();
        const ordered = /\d/.test(bullet[1]);
        if (!list || (list.tagName === "OL") !== ordered) {
          list = document.createElement(ordered ? "ol" : "ul");
          root.append(list);
        }
        const li = document.createElement("li");
        inline(bullet[2], li);
        list.append(li);
      } else if (quote) {
        flush();
        list = null;
        const q = document.createElement("blockquote");
        inline(quote[1], q);
        root.append(q);
      } else if (!line.trim()) {
        flush();
        list = null;
      } else {
        list = null;
        para.push(line);
      }
    }
    flush();
    return root;
  }

  window.renderMarkdown = render;
})();
