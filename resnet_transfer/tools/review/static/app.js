// rt review: the page. Plain JavaScript, no framework, no network but this server.
// State that must survive a reload (filters, page, selected row) lives in the address's #fragment; labels
// live on the server, which writes each change to the manifest before it answers.
"use strict";
(() => {
  const TOKEN = document.querySelector('meta[name="rt-token"]').content;
  const $ = (id) => document.getElementById(id);
  const PALETTE = ["#2f6fdf", "#d9480f", "#2b8a3e", "#ae3ec9", "#e8590c", "#1098ad", "#c2255c", "#5f3dc4",
    "#5c940d", "#a61e4d", "#0b7285", "#862e9c"];
  const FILTERS = { class: "f-class", finding: "f-finding", verdict: "f-verdict", status: "f-status", sort: "f-sort" };
  const S = {
    info: null, q: { class: "", finding: "", verdict: "", status: "", sort: "auto" }, offset: 0, limit: 120,
    rows: [], total: 0, sel: -1, version: -1, peek: null, detail: null, busy: false, wantRow: null,
  };

  // ------------------------------------------------------------------------------------------ helpers
  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k === "style") e.style.cssText = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of kids.flat()) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  const fmt = (n) => n.toLocaleString("en-US");
  let toastTimer = 0;
  function toast(text) {
    const t = $("toast");
    t.textContent = text;
    t.classList.add("show");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => t.classList.remove("show"), 2600);
  }
  async function api(path, body) {
    const opts = { credentials: "same-origin", headers: {} };
    if (body !== undefined) {
      opts.method = "POST";
      opts.headers["Content-Type"] = "application/json";
      opts.headers["X-RT-Token"] = TOKEN;
      opts.body = JSON.stringify(body);
    }
    const res = await fetch(path, opts);
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) {
      const msg = (data && data.error) || `${res.status} ${res.statusText}`;
      toast(msg + (data && data.hint ? ` (${data.hint})` : ""));
      throw new Error(msg);
    }
    return data;
  }
  function classIndex(label) {
    if (!S.info || label === null || label === undefined) return -1;
    return S.info.classes.findIndex((c) => c.name === label);
  }
  function colour(label) {
    const i = classIndex(label);
    return i < 0 ? "#7a8396" : PALETTE[i % PALETTE.length];
  }
  function chip(label, extra) {
    if (label === null || label === undefined) return el("span", { class: "chip none", text: "unlabelled" });
    return el("span", { class: "chip " + (extra || ""), style: `--c:${colour(label)}`, text: label, title: label });
  }
  function placeholder(text) { return el("div", { class: "ph", text }); }
  function image(src, alt, onfail) {
    return el("img", { src, alt, loading: "lazy", decoding: "async", onerror: onfail });
  }

  // ------------------------------------------------------------------------------------------ address
  function readHash() {
    const h = new URLSearchParams(location.hash.slice(1));
    for (const k of Object.keys(FILTERS)) S.q[k] = h.get(k) || (k === "sort" ? "auto" : "");
    S.offset = Math.max(0, parseInt(h.get("offset") || "0", 10) || 0);
    const row = h.get("row");
    S.wantRow = row === null ? null : parseInt(row, 10);
  }
  function writeHash() {
    const h = new URLSearchParams();
    for (const [k, v] of Object.entries(S.q)) if (v && !(k === "sort" && v === "auto")) h.set(k, v);
    if (S.offset) h.set("offset", String(S.offset));
    const r = S.rows[S.sel];
    if (r) h.set("row", String(r.row));
    history.replaceState(null, "", "#" + h.toString());
  }

  // ------------------------------------------------------------------------------------------ info
  async function loadInfo() {
    S.info = await api("/api/info");
    const i = S.info;
    $("cache-name").textContent = `${i.name.split("/").pop()} · ${fmt(i.rows)} rows`;
    $("cache-name").title = i.name;
    $("manifest-path").textContent = `manifest: ${i.manifest}`;
    $("help-commands").textContent = i.commands.join("\n");
    const cls = $("f-class");
    const keep = S.q.class;
    cls.replaceChildren(el("option", { value: "", text: `all (${fmt(i.rows)})` }));
    i.classes.forEach((c, k) => cls.append(el("option", { value: c.name, text: `${k < 9 ? k + 1 + " · " : ""}${c.name} (${fmt(c.count)})` })));
    cls.append(el("option", { value: "(unlabelled)", text: `unlabelled (${fmt(i.unlabelled)})` }));
    cls.value = keep;
    const counts = i.findings.counts;
    for (const opt of $("f-finding").options) {
      if (counts[opt.value] !== undefined) opt.textContent = `${opt.textContent.replace(/ \(.*\)$/, "")} (${fmt(counts[opt.value])})`;
    }
    const noHead = !i.head;
    $("f-verdict").disabled = noHead;
    $("f-verdict").title = noHead ? "start rt review with --head DIR (a head from rt fit-head)" : `uncertain: top probability under ${i.head.uncertain}`;
    for (const opt of $("f-sort").options) if (["loss", "confidence", "confidence_asc"].includes(opt.value)) opt.disabled = noHead;
    renderBanners();
    counters(i);
  }
  function renderBanners() {
    const b = $("banners");
    b.replaceChildren();
    const im = S.info.images;
    if (im.sampled && im.found < im.sampled) {
      const none = im.found === 0;
      b.append(el("div", { class: "banner" + (none ? " bad" : "") },
        none ? "No images found. " : `${im.sampled - im.found} of ${im.sampled} sampled images are missing. `,
        "Looked in ", el("code", { text: im.root || "(no folder known)" }), ` (${im.where}). `,
        "Start rt review with ", el("code", { text: "--root DIR" }), ", the folder the cache was extracted from."));
    }
    for (const note of S.info.notes) {
      if (note.startsWith("no images found")) continue;
      b.append(el("div", { class: "banner", text: note }));
    }
    if (S.info.outside) {
      b.append(el("div", { class: "banner", text: `${S.info.outside} image path(s) lie outside the manifest's folder: run rt extract on it with --allow-outside.` }));
    }
  }
  function counters(c) {
    if (c.version !== undefined) S.version = c.version;
    const p = $("pending");
    p.textContent = `${fmt(c.pending)} change${c.pending === 1 ? "" : "s"}`;
    p.classList.toggle("some", c.pending > 0);
    $("undo").disabled = !c.can_undo;
  }
  let infoTimer = 0;
  function refreshInfoSoon() { clearTimeout(infoTimer); infoTimer = setTimeout(() => loadInfo().catch(() => {}), 400); }

  // ------------------------------------------------------------------------------------------ grid
  function query() {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(S.q)) if (v) p.set(k, v);
    p.set("offset", String(S.offset));
    p.set("limit", String(S.limit));
    return p.toString();
  }
  async function loadRows(keep) {
    const selRow = keep ? (S.rows[S.sel] || {}).row : S.wantRow;
    const seq = (S.rowsSeq = (S.rowsSeq || 0) + 1);
    const data = await api("/api/rows?" + query());
    if (seq !== S.rowsSeq) return;  // a later filter or page asked again: its answer wins, not this older one
    if (data.total && S.offset >= data.total) { S.offset = Math.floor((data.total - 1) / S.limit) * S.limit; return loadRows(keep); }
    S.rows = data.rows;
    S.total = data.total;
    counters(data);
    renderGrid();
    let idx = S.rows.findIndex((r) => r.row === selRow);
    if (idx < 0) idx = keep ? Math.min(S.sel, S.rows.length - 1) : 0;
    S.wantRow = null;
    select(S.rows.length ? Math.max(0, idx) : -1, !keep);
  }
  function tile(r, i) {
    const frame = el("div", { class: "frame" });
    if (r.exists) frame.append(image(r.thumb, r.path, (e) => e.target.replaceWith(placeholder("unreadable"))));
    else frame.append(placeholder("missing"));
    const cap = el("div", { class: "cap" });
    if (r.status === "relabelled") cap.append(el("span", { class: "was", text: r.given === null ? "unlabelled" : r.given }));
    cap.append(chip(r.status === "excluded" ? r.given : r.label), el("span", { class: "row-no", text: `#${r.row}` }));
    const badges = el("div", { class: "badges" }, r.badges.map((b) => el("span", { class: "badge " + b.kind, text: b.text })));
    const t = el("div", {
      class: `tile ${r.status}`, role: "option", title: r.path, "data-row": r.row,
      onclick: () => { S.peek = null; select(i, false); $("grid").focus({ preventScroll: true }); },
    }, frame, cap, badges);
    if (r.wrong && r.pred) t.append(el("span", { class: "pred", text: `${r.pred.label} ${r.pred.p.toFixed(2)}`, title: "the head's prediction" }));
    if (r.status === "excluded") t.append(el("span", { class: "pred", style: "background:#5b6375", text: "excluded" }));
    return t;
  }
  function renderGrid() {
    const g = $("grid");
    g.replaceChildren(...S.rows.map(tile));
    $("empty").hidden = S.rows.length > 0;
    const last = Math.min(S.total, S.offset + S.rows.length);
    $("range").textContent = S.total ? `${fmt(S.offset + 1)}–${fmt(last)} of ${fmt(S.total)}` : "0 rows";
    $("prev").disabled = S.offset === 0;
    $("next").disabled = S.offset + S.limit >= S.total;
    for (const [k, id] of Object.entries(FILTERS)) $(id).classList.toggle("active", !!S.q[k] && S.q[k] !== "auto");
  }
  function replaceTile(r) {
    const i = S.rows.findIndex((x) => x.row === r.row);
    if (i < 0) return;
    S.rows[i] = r;
    const old = $("grid").children[i];
    const t = tile(r, i);
    if (i === S.sel) t.classList.add("sel");
    old.replaceWith(t);
  }
  function select(i, scrollTop) {
    const g = $("grid");
    if (S.sel >= 0 && g.children[S.sel]) g.children[S.sel].classList.remove("sel");
    S.sel = i;
    if (i < 0) { showDetail(null); writeHash(); return; }
    const t = g.children[i];
    t.classList.add("sel");
    if (scrollTop && i === 0) $("view").scrollTop = 0;
    else t.scrollIntoView({ block: "nearest" });
    writeHash();
    loadDetailSoon(S.rows[i].row);
  }
  function columns() {
    const kids = $("grid").children;
    if (!kids.length) return 1;
    const top = kids[0].offsetTop;
    let n = 0;
    while (n < kids.length && kids[n].offsetTop === top) n++;
    return Math.max(1, n);
  }
  async function move(delta) {
    S.peek = null;
    const j = S.sel + delta;
    if (j >= 0 && j < S.rows.length) return select(j, false);
    if (j >= S.rows.length && S.offset + S.limit < S.total) { await page(1); return; }
    if (j < 0 && S.offset > 0) { await page(-1, true); return; }
    select(Math.max(0, Math.min(S.rows.length - 1, j)), false);
  }
  async function page(dir, toLast) {
    S.offset = Math.max(0, S.offset + dir * S.limit);
    S.wantRow = null;
    await loadRows(false);
    if (toLast && S.rows.length) select(S.rows.length - 1, false);
  }

  // ------------------------------------------------------------------------------------------ detail
  let detailTimer = 0;
  function loadDetailSoon(row) {
    clearTimeout(detailTimer);
    detailTimer = setTimeout(() => loadDetail(row), 60);
  }
  async function loadDetail(row) {
    try {
      const d = await api(`/api/row/${row}`);
      const want = S.peek !== null ? S.peek : (S.rows[S.sel] || {}).row;
      if (d.row === want) showDetail(d);
    } catch (e) { /* toast shown */ }
  }
  function activeRow() { return S.peek !== null ? S.peek : (S.rows[S.sel] || {}).row; }
  function showDetail(d) {
    S.detail = d;
    $("panel-empty").hidden = !!d;
    $("panel-body").hidden = !d;
    if (!d) return;
    $("peek").hidden = S.peek === null;
    $("large").hidden = !d.exists;
    $("large-ph").hidden = d.exists;
    if (d.exists) { $("large").src = d.large; $("large").alt = d.path; }
    else { $("large").removeAttribute("src"); $("large-ph").textContent = `missing: ${d.location || d.path}`; }
    $("large-link").href = d.file;
    $("p-path").textContent = d.path;
    const lab = $("p-label");
    lab.replaceChildren();
    if (d.status === "excluded") lab.append(el("b", { text: "excluded" }), el("span", { class: "muted", text: " (was " }), chip(d.given), el("span", { class: "muted", text: ")" }));
    else if (d.status === "relabelled") lab.append(chip(d.given, "was-chip"), el("span", { text: "→" }), chip(d.label));
    else lab.append(chip(d.label), el("span", { class: "muted small", text: "as in the cache" }));
    const cls = $("p-classes");
    cls.replaceChildren(...S.info.classes.map((c, k) => el("button", {
      type: "button", class: d.label === c.name && d.status !== "excluded" ? "on" : "", style: `--c:${colour(c.name)}`,
      onclick: () => setLabel(c.name), title: `set the class to ${c.name}`,
    }, el("span", { class: "sw" }), k < 9 ? el("kbd", { text: String(k + 1) }) : null, c.name)));
    $("p-exclude").classList.toggle("on", d.status === "excluded");
    $("p-exclude").firstChild.textContent = d.status === "excluded" ? "include " : "exclude ";
    renderProbs(d);
    renderFindings(d);
    renderNeighbours(d);
  }
  function renderProbs(d) {
    const box = $("p-probs");
    box.replaceChildren();
    $("h-probs").textContent = S.info.head ? "Head: probabilities" : "Head";
    if (!d.probs) { box.append(el("div", { class: "muted small", text: "start rt review with --head DIR to see the head's verdict" })); return; }
    for (const p of d.probs.slice(0, 6)) {
      box.append(el("div", { class: "bar" + (p.label === d.label ? " cur" : "") },
        el("span", { class: "name", text: p.label, title: p.label }),
        el("span", { class: "track" }, el("span", { class: "fill", style: `width:${(100 * p.p).toFixed(1)}%;--c:${colour(p.label)}` })),
        el("span", { class: "num", text: p.p.toFixed(3) })));
    }
    if (d.loss !== undefined && d.loss !== null) box.append(el("div", { class: "muted small", text: `loss of the label: ${d.loss.toFixed(3)}` }));
  }
  function findingText(f) {
    if (f.kind === "label_error") return `likely label error: labelled ${f.given} (p=${(f.p_given ?? 0).toFixed(2)}), looks like ${f.suggested} (p=${(f.p_suggested ?? 0).toFixed(2)})`;
    if (f.kind === "duplicate") return f.exact ? `same file as ${f.path}` : `near duplicate of ${f.path} (cosine ${(f.cosine ?? 0).toFixed(3)})`;
    if (f.kind === "leak") return f.exact ? `also in the test set: ${f.test_path}` : `near a test image: ${f.test_path} (cosine ${(f.cosine ?? 0).toFixed(3)})`;
    return `outlier (LOF ${(f.lof ?? 0).toFixed(2)}, rank ${f.rank + 1})`;
  }
  function renderFindings(d) {
    const box = $("p-findings");
    box.replaceChildren();
    $("h-findings").hidden = !d.findings.length;
    for (const f of d.findings) {
      const kids = [];
      if (f.partner && f.partner.exists === false) kids.push(placeholder("missing"));
      else if (f.partner) {
        const img = image(f.partner.thumb, f.partner.path, (e) => e.target.replaceWith(placeholder("?")));
        if (f.partner.row !== undefined) { img.style.cursor = "pointer"; img.addEventListener("click", () => peek(f.partner.row)); }
        kids.push(img);
      }
      kids.push(el("span", {}, el("span", { class: "badge " + f.kind, text: f.kind.replace("_", " ") }), " ", findingText(f)));
      box.append(el("div", { class: "f" }, kids));
    }
  }
  function renderNeighbours(d) {
    const box = $("p-neighbours");
    box.replaceChildren(...d.neighbours.map((n) => el("div", { class: "nb", title: `${n.path}\ncosine ${n.cosine}`, onclick: () => peek(n.row) },
      el("div", { class: "frame" }, n.exists ? image(n.thumb, n.path, (e) => e.target.replaceWith(placeholder("?"))) : placeholder("missing")),
      el("div", { class: "cap" }, chip(n.label), el("span", { class: "muted", text: n.cosine.toFixed(2) })))));
  }
  function peek(row) {
    const inGrid = S.rows.findIndex((r) => r.row === row);
    if (inGrid >= 0) { S.peek = null; select(inGrid, false); return; }
    S.peek = row;
    loadDetail(row);
  }

  // ------------------------------------------------------------------------------------------ changes
  let chain = Promise.resolve();
  function queue(fn) {  // changes go to the server one after another, in the order of the key presses
    chain = chain.then(fn).catch(() => {});
    return chain;
  }
  function change(path, body) {
    const row = activeRow();
    if (row === undefined || row === null) return chain;
    return queue(async () => {
      S.busy = true;
      try { afterChange(await api(path, { row, ...body }), { advance: true }); } finally { S.busy = false; }
    });
  }
  function afterChange(res, how) {
    counters(res);
    if (res.reloaded) toast("the manifest was changed by another program: reloaded, then your change applied");
    refreshInfoSoon();
    if (!res.row) { toast("nothing to undo"); return; }
    replaceTile(res.row);
    const grid = S.rows.findIndex((r) => r.row === res.row.row);
    if (S.peek !== null) { if (S.peek === res.row.row) loadDetail(S.peek); return; }
    if (how.focus && grid >= 0 && grid !== S.sel) { select(grid, false); return; }
    if (grid !== S.sel) return;  // the selection moved on meanwhile: leave it there
    if (how.advance && $("advance").checked && grid < S.rows.length - 1) { select(grid + 1, false); return; }
    loadDetail(res.row.row);
  }
  function setLabel(label) { return change("/api/label", { label }); }
  function statusOf(row) {
    const r = S.rows.find((x) => x.row === row);
    if (r) return r.status;
    return S.detail && S.detail.row === row ? S.detail.status : null;
  }
  function toggleExclude() {
    return change("/api/exclude", { excluded: statusOf(activeRow()) !== "excluded" });
  }
  function undo() {
    return queue(async () => {
      const res = await api("/api/undo", {});
      afterChange(res, { focus: true });
      if (res.row) toast(`undone: #${res.row.row} is ${res.row.status === "excluded" ? "excluded" : res.row.label ?? "unlabelled"} again`);
    });
  }

  // ------------------------------------------------------------------------------------------ input
  function onKey(e) {
    const help = !$("help").hidden;
    if (e.key === "Escape") {
      if (help) { $("help").hidden = true; return; }
      if (S.peek !== null) { S.peek = null; select(S.sel, false); return; }
      document.activeElement.blur();
      $("grid").focus();
      return;
    }
    if (e.target.tagName === "SELECT" || e.target.tagName === "INPUT" || e.ctrlKey && e.key !== "z" || e.metaKey || e.altKey) return;
    if (e.key === "?") { $("help").hidden = help; e.preventDefault(); return; }
    if (help) return;
    const cols = columns();
    const keys = {
      ArrowRight: () => move(1), ArrowLeft: () => move(-1), ArrowDown: () => move(cols), ArrowUp: () => move(-cols),
      Home: () => select(0, false), End: () => select(S.rows.length - 1, false),
      PageDown: () => page(1), "]": () => page(1), PageUp: () => page(-1), "[": () => page(-1),
      x: toggleExclude, u: undo, z: () => e.ctrlKey && undo(), "0": () => setLabel(null),
      o: () => S.detail && window.open(S.detail.file, "_blank", "noopener"),
    };
    if (/^[1-9]$/.test(e.key)) {
      const c = S.info.classes[parseInt(e.key, 10) - 1];
      if (c) setLabel(c.name); else toast(`no class ${e.key}: this review has ${S.info.classes.length}`);
      e.preventDefault();
      return;
    }
    const fn = keys[e.key];
    if (fn) { e.preventDefault(); fn(); }
  }
  function onFilter(k, id) {
    S.q[k] = $(id).value;
    S.offset = 0;
    S.peek = null;
    S.wantRow = null;
    $(id).blur();
    $("grid").focus({ preventScroll: true });
    loadRows(false).catch(() => {});
  }
  async function poll() {
    try {
      const s = await api("/api/state");
      if (s.version !== S.version && !S.busy) {
        if (s.reloaded) toast("the manifest was changed by another program: reloaded");
        else toast("labels changed in another tab: updated");
        S.version = s.version;
        await loadRows(true);
        refreshInfoSoon();
      }
      counters(s);
    } catch (e) { /* server gone: the toast said so */ }
    setTimeout(poll, 3000);
  }

  async function start() {
    readHash();
    for (const [k, id] of Object.entries(FILTERS)) { $(id).value = S.q[k]; $(id).addEventListener("change", () => onFilter(k, id)); }
    document.addEventListener("keydown", onKey);
    $("prev").addEventListener("click", () => page(-1));
    $("next").addEventListener("click", () => page(1));
    $("undo").addEventListener("click", undo);
    $("p-exclude").addEventListener("click", toggleExclude);
    $("p-unlabel").addEventListener("click", () => setLabel(null));
    $("help-button").addEventListener("click", () => { $("help").hidden = false; });
    $("help").addEventListener("click", (e) => { if (e.target === $("help")) $("help").hidden = true; });
    $("pending").addEventListener("click", () => { $("help").hidden = false; });
    await loadInfo();
    for (const [k, id] of Object.entries(FILTERS)) $(id).value = S.q[k];
    await loadRows(false);
    $("grid").focus({ preventScroll: true });
    document.body.dataset.ready = "1";
    setTimeout(poll, 3000);
  }
  start().catch((e) => toast(String(e)));
})();
