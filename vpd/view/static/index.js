// vpd view: the question index. Filters, search and counts over VPD_INDEX's columns in one
// pass (100k questions filter in milliseconds), one page of rows rendered at a time, the
// state kept in the URL's hash so the back button returns to the same view.
"use strict";
(function (V) {
  const I = window.VPD_INDEX;
  const META = window.VPD_META;
  const PAGE = 100;
  const n = I.n;
  const T0 = performance.now();

  // A facet: values (names), the row's value code (single) or a bitmask (multi).
  const facets = [
    { key: "type", label: "type", values: I.types, code: (i) => I.type[i] },
    { key: "dataset", label: "dataset", values: I.datasets, code: (i) => I.dataset[i] },
    { key: "split", label: "split", values: I.splits, code: (i) => I.split[i] },
    {
      key: "kept",
      label: "programs",
      values: ["kept", "none kept", "no programs"],
      code: (i) => (I.nprog[i] === 0 ? 2 : I.nkept[i] > 0 ? 0 : 1),
    },
    { key: "status", label: "status (any program)", values: I.statuses, bits: (i) => I.status[i] },
    {
      key: "rationale",
      label: "rationale",
      values: ["with rationale", "without"],
      code: (i) => (I.nrat[i] > 0 ? 0 : 1),
    },
  ];
  for (const arm of I.arms) {
    const col = I.arm[arm];
    facets.push({
      key: "arm:" + arm,
      label: arm,
      values: ["right", "wrong", "not answered"],
      code: (i) => {
        const c = col.charCodeAt(i);
        return c === 49 ? 0 : c === 48 ? 1 : 2; // "1" right, "0" wrong, "." none
      },
    });
  }
  const sel = facets.map(() => -1); // -1: any
  let search = "";
  let page = 0;
  let hits = new Int32Array(0);
  // Lower-cased "id text" per row, built once, for the search box.
  const hay = new Array(n);
  for (let i = 0; i < n; i++) hay[i] = (I.id[i] + " " + I.text[i]).toLowerCase();

  function matches(f, i, v) {
    return f.bits ? (f.bits(i) >> v) & 1 : f.code(i) === v;
  }

  // One pass: a row failing no filter is a hit and counts for every facet's values; a row
  // failing exactly one facet counts for that facet only (its count if it were changed).
  function run() {
    const counts = facets.map((f) => new Int32Array(f.values.length));
    const totals = new Int32Array(facets.length); // rows passing the other filters
    const out = new Int32Array(n);
    let m = 0;
    const nf = facets.length;
    for (let i = 0; i < n; i++) {
      if (search && hay[i].indexOf(search) < 0) continue;
      let nfail = 0;
      let which = -1;
      for (let k = 0; k < nf; k++) {
        const s = sel[k];
        if (s >= 0 && !matches(facets[k], i, s)) {
          nfail++;
          which = k;
          if (nfail > 1) break;
        }
      }
      if (nfail > 1) continue;
      for (let k = 0; k < nf; k++) {
        if (nfail === 1 && k !== which) continue;
        const f = facets[k];
        totals[k]++;
        if (f.bits) {
          let b = f.bits(i);
          for (let v = 0; b; v++, b >>= 1) if (b & 1) counts[k][v]++;
        } else counts[k][f.code(i)]++;
      }
      if (nfail === 0) out[m++] = i;
    }
    hits = out.subarray(0, m);
    return { counts, totals };
  }

  function renderControls(res) {
    const box = document.getElementById("facets");
    box.innerHTML = facets
      .map((f, k) => {
        if (f.values.length === 0) return "";
        const opts = [`<option value="-1">any (${res.totals[k]})</option>`].concat(
          f.values.map(
            (v, j) =>
              `<option value="${j}"${sel[k] === j ? " selected" : ""}>${V.esc(v)} (${res.counts[k][j]})</option>`,
          ),
        );
        return `<label>${V.esc(f.label)}<select data-k="${k}" name="${V.esc(f.key)}">${opts.join("")}</select></label>`;
      })
      .join("");
  }

  function statusChips(bits) {
    const out = [];
    I.statuses.forEach((s, j) => {
      if ((bits >> j) & 1) out.push(`<span class="st ${s}">${s}</span>`);
    });
    return out.join("");
  }

  function renderRows() {
    const pages = Math.max(1, Math.ceil(hits.length / PAGE));
    page = Math.min(page, pages - 1);
    const rows = [];
    const end = Math.min(hits.length, (page + 1) * PAGE);
    for (let h = page * PAGE; h < end; h++) {
      const i = hits[h];
      const arms = I.arms
        .map((a) => {
          const c = I.arm[a][i];
          return `<td>${c === "1" ? '<span class="ok">✓</span>' : c === "0" ? '<span class="bad">✗</span>' : '<span class="muted">·</span>'}</td>`;
        })
        .join("");
      rows.push(
        `<tr><td class="mono"><a href="${V.qurl(I.id[i])}">${V.esc(I.id[i])}</a></td>` +
          `<td class="q">${V.esc(I.text[i])}</td><td>${V.esc(I.types[I.type[i]])}</td>` +
          `<td>${V.esc(I.splits[I.split[i]])}</td>` +
          `<td>${I.nprog[i] ? I.nkept[i] + "/" + I.nprog[i] : '<span class="muted">-</span>'}</td>` +
          `<td>${statusChips(I.status[i])}</td><td>${I.nrat[i] || ""}</td>${arms}</tr>`,
      );
    }
    document.getElementById("rows").innerHTML = rows.join("");
    const c = document.getElementById("count");
    c.textContent = `${hits.length.toLocaleString("en")} of ${n.toLocaleString("en")} questions`;
    c.dataset.n = String(hits.length);
    document.getElementById("pageinfo").textContent = `page ${page + 1} of ${pages}`;
    document.getElementById("prev").disabled = page === 0;
    document.getElementById("next").disabled = page >= pages - 1;
    const first = Array.from(hits).find((i) => I.nrat[i] > 0);
    const rate = document.getElementById("startrate");
    if (rate) rate.href = first === undefined ? "#" : V.qurl(I.id[first]);
  }

  function update(keepPage) {
    if (!keepPage) page = 0;
    const t = performance.now();
    const res = run();
    renderControls(res);
    renderRows();
    window.VPD_TIMING.filter_ms = performance.now() - t;
    saveHash();
  }

  function saveHash() {
    const parts = [];
    facets.forEach((f, k) => {
      if (sel[k] >= 0) parts.push(encodeURIComponent(f.key) + "=" + encodeURIComponent(f.values[sel[k]]));
    });
    if (search) parts.push("q=" + encodeURIComponent(search));
    if (page) parts.push("page=" + (page + 1));
    history.replaceState(null, "", parts.length ? "#" + parts.join("&") : location.pathname + location.search);
  }

  function loadHash() {
    const h = location.hash.slice(1);
    if (!h) return;
    for (const part of h.split("&")) {
      const [k, v] = part.split("=").map(decodeURIComponent);
      if (k === "q") search = v;
      else if (k === "page") page = Math.max(0, parseInt(v, 10) - 1 || 0);
      else {
        const fk = facets.findIndex((f) => f.key === k);
        if (fk >= 0) sel[fk] = facets[fk].values.indexOf(v);
      }
    }
  }

  V.header("questions");
  const head = document.getElementById("head");
  head.innerHTML =
    "<th>id</th><th>question</th><th>type</th><th>split</th><th>kept</th><th>status</th><th>rationales</th>" +
    I.arms.map((a) => `<th>${V.esc(a)}</th>`).join("");
  document.getElementById("facets").addEventListener("change", (e) => {
    const k = Number(e.target.dataset.k);
    sel[k] = Number(e.target.value);
    update(false);
  });
  const sbox = document.getElementById("search");
  let timer = null;
  sbox.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      search = sbox.value.trim().toLowerCase();
      update(false);
    }, 120);
  });
  document.getElementById("prev").onclick = () => {
    page--;
    renderRows();
    saveHash();
  };
  document.getElementById("next").onclick = () => {
    page++;
    renderRows();
    saveHash();
  };
  if (META.rate) {
    document.getElementById("rateinfo").innerHTML =
      '<a id="startrate" href="#">rate the rationales of these questions →</a>';
    document.addEventListener("keydown", (e) => {
      if (e.key === "e" && e.target.tagName !== "INPUT") V.ratings.exportFile();
    });
  }
  // A link or the user edits the hash: the view follows (replaceState fires no event).
  window.addEventListener("hashchange", () => {
    sel.fill(-1);
    search = "";
    page = 0;
    loadHash();
    sbox.value = search;
    update(true);
  });
  window.VPD_TIMING = { load_ms: 0, filter_ms: 0 };
  loadHash();
  sbox.value = search;
  update(true);
  window.VPD_TIMING.load_ms = performance.now() - T0;
  // Since navigation start: the data file's download and parse included.
  window.VPD_TIMING.ready_ms = performance.now();
  window.VPD_READY = true;
})(window.VPD);
