// vpd view: helpers every page shares (escaping, shard lookup, the ratings store, the header).
"use strict";
window.VPD = window.VPD || {};
(function (V) {
  const META = window.VPD_META || {};

  V.esc = (s) =>
    String(s === null || s === undefined ? "" : s).replace(
      /[&<>"']/g,
      (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c],
    );
  V.qurl = (id) => "question.html?id=" + encodeURIComponent(id);

  // 32-bit FNV-1a of the UTF-8 bytes: the same hash vpd/view/data.py shards questions by.
  V.fnv1a = function (s) {
    let h = 0x811c9dc5;
    for (const b of new TextEncoder().encode(s)) {
      h ^= b;
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    return h >>> 0;
  };
  V.shardFile = (qid) => {
    const n = V.fnv1a(qid) % META.n_shards;
    return "data/q/" + String(n).padStart(5, "0") + ".js";
  };

  // ---------------------------------------------------------------- ratings
  // Kept in localStorage per site (file:// pages share one origin), one record per
  // rationale; served by `vpd view --serve`, every change is also POSTed to the server.
  const KEY = "vpd-ratings:" + META.site_id;
  const served = location.protocol === "http:" || location.protocol === "https:";
  const listeners = [];
  const R = {
    served,
    all() {
      try {
        return JSON.parse(localStorage.getItem(KEY) || "{}");
      } catch (e) {
        return {};
      }
    },
    get(id) {
      return this.all()[id];
    },
    put(rec) {
      const a = this.all();
      a[rec.id] = rec;
      localStorage.setItem(KEY, JSON.stringify(a));
      if (served) {
        fetch("api/ratings", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(rec),
        }).catch((e) => console.warn("rating not sent to the server:", e.message));
      }
      listeners.forEach((f) => f());
    },
    count() {
      return Object.keys(this.all()).length;
    },
    // The JSONL `vpd report --ratings` reads: one rating per line, by rationale id.
    jsonl() {
      const recs = Object.values(this.all()).sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
      return recs.map((r) => JSON.stringify(r)).join("\n") + (recs.length ? "\n" : "");
    },
    exportFile() {
      const blob = new Blob([this.jsonl()], { type: "application/x-ndjson" });
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = "ratings.jsonl";
      document.body.appendChild(a);
      a.click();
      setTimeout(() => {
        URL.revokeObjectURL(a.href);
        a.remove();
      }, 1000);
    },
    onChange(f) {
      listeners.push(f);
    },
    // Served: the server's ratings (another browser's, an earlier session's) join ours;
    // the later change of each rationale wins.
    sync() {
      if (!served) return Promise.resolve();
      return fetch("api/ratings")
        .then((r) => (r.ok ? r.json() : []))
        .then((list) => {
          const a = this.all();
          let changed = false;
          for (const rec of list) {
            const mine = a[rec.id];
            if (!mine || String(mine.time || "") < String(rec.time || "")) {
              a[rec.id] = rec;
              changed = true;
            }
          }
          if (changed) {
            localStorage.setItem(KEY, JSON.stringify(a));
            listeners.forEach((f) => f());
          }
        })
        .catch(() => {});
    },
  };
  V.ratings = R;
  V.rater = () => localStorage.getItem("vpd-rater") || "";

  // ---------------------------------------------------------------- header
  V.header = function (here) {
    const h = document.createElement("header");
    h.className = "top";
    const links = [
      ["index.html", "Report", "report"],
      ["questions.html", "Questions", "questions"],
    ].filter((l) => l[2] !== "report" || META.has_report);
    h.innerHTML =
      `<span class="brand">vpd view</span><span class="muted">${V.esc(META.title || "")}</span>` +
      links.map(([u, t, k]) => `<a href="${u}" class="${k === here ? "here" : ""}">${t}</a>`).join("") +
      `<span class="grow"></span>`;
    if (META.rate) {
      h.innerHTML +=
        `<label>rater <input id="rater" size="8" value="${V.esc(V.rater())}"></label>` +
        `<span id="nrated"></span><button id="export" title="download ratings.jsonl (e)">export ratings</button>`;
    }
    document.body.prepend(h);
    if (META.rate) {
      const show = () => (document.getElementById("nrated").textContent = R.count() + " rated");
      show();
      R.onChange(show);
      document.getElementById("export").onclick = () => R.exportFile();
      document.getElementById("rater").onchange = (e) => localStorage.setItem("vpd-rater", e.target.value.trim());
      R.sync();
    }
  };
})(window.VPD);
