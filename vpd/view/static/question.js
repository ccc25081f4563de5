// vpd view: one question. Its record comes from the shard file its id hashes to (a
// <script src>, so the page works from file://); the selected program's box-returning
// calls are drawn over the image(s), one colour per call; with --rate, each rationale
// gets the human-evaluation questions and keyboard shortcuts.
"use strict";
(function (V) {
  const META = window.VPD_META;
  const COLORS = [
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#1fb5c9",
    "#f032e6", "#9a6324", "#800000", "#469990", "#000075", "#8fb000",
  ];
  const QS = [
    ["answer_right", "Is the answer right?"],
    ["factual", "Is the explanation factual?"],
    ["consistent", "Is it consistent with the answer?"],
  ];
  // VisProg modules that make the same tool calls as the ImagePatch methods.
  const ALIAS = { find: ["LOC("], crop: ["CROP"], simple_query: ["VQA("] };
  const BOX_RE = /\[\s*(-?\d*\.?\d+)\s*,\s*(-?\d*\.?\d+)\s*,\s*(-?\d*\.?\d+)\s*,\s*(-?\d*\.?\d+)\s*\]/g;
  const qid = new URLSearchParams(location.search).get("id");
  const main = document.getElementById("q");
  let Q = null;
  let sel = 0; // the program whose trace is drawn
  const act = { ri: 0, qi: 0 }; // the rating question the keys answer

  const color = (i) => COLORS[i % COLORS.length];
  const tip = document.getElementById("tip");

  function fmtArgs(c) {
    const parts = [];
    for (const [k, v] of Object.entries(c.args || {})) {
      if (k === "patch") continue;
      parts.push(typeof v === "string" ? JSON.stringify(v) : k + "=" + JSON.stringify(v));
    }
    const p = (c.args || {}).patch;
    const whole = !p || (p[0] === 0 && p[1] === 0 && p[2] === 1 && p[3] === 1);
    return `${c.name}(${parts.join(", ")})` + (whole ? "" : ` on [${p.join(", ")}]`);
  }
  function shortResult(c) {
    if (c.boxes) return c.boxes.length === 1 ? "1 box" : c.boxes.length ? c.boxes.length + " boxes" : "nothing";
    const r = String(c.result === undefined ? "" : c.result);
    return r.length > 40 ? r.slice(0, 39) + "…" : r;
  }
  const callTitle = (c, i) => `#${i} ${fmtArgs(c)}\n→ ${c.result}` + (c.ms !== undefined ? `\n${c.ms} ms` : "");

  function rectOf(b) {
    // [left, lower, right, upper] in 0..1 with y from the BOTTOM -> SVG (y down, 0..1000).
    const [l, lo, r, up] = b.map(Number);
    return `x="${(l * 1000).toFixed(1)}" y="${((1 - up) * 1000).toFixed(1)}" width="${((r - l) * 1000).toFixed(1)}" height="${((up - lo) * 1000).toFixed(1)}"`;
  }

  // ------------------------------------------------------------------ images
  function draw() {
    const prog = Q.programs[sel];
    const svgs = Array.from(document.querySelectorAll(".imgbox svg"));
    const layers = svgs.map(() => []);
    if (prog) {
      prog.trace.forEach((c, i) => {
        if (!c.boxes) return;
        const j = Math.min(c.image || 0, svgs.length - 1);
        const rects = c.boxes.map((b) => `<rect ${rectOf(b)}></rect>`).join("");
        layers[j].push(
          `<g class="call" data-call="${i}" style="--c:${color(i)}"><title>${V.esc(callTitle(c, i))}</title>${rects}</g>`,
        );
      });
    }
    Q.rationales.forEach((r, ri) => {
      const boxes = rationaleBoxes(r);
      const byImg = svgs.map(() => []);
      boxes.forEach((b, bi) => {
        const j = Math.min(b.image, svgs.length - 1);
        byImg[j].push(`<rect data-bi="${bi}" style="--c:${b.color}" ${rectOf(b.box)}></rect>`);
      });
      byImg.forEach((rs, j) => {
        if (rs.length) layers[j].push(`<g class="rat" data-ri="${ri}">${rs.join("")}</g>`);
      });
    });
    svgs.forEach((s, j) => (s.innerHTML = layers[j].join("")));
    const legend = document.getElementById("legend");
    if (!prog) {
      legend.innerHTML = '<span class="muted">no program</span>';
      return;
    }
    legend.innerHTML =
      `<div class="muted">calls of program #${V.esc(prog.k)} (${V.esc(prog.src)}):</div>` +
      (prog.trace.length
        ? prog.trace
            .map(
              (c, i) =>
                `<span class="chip" data-call="${i}" style="--c:${color(i)}" title="${V.esc(callTitle(c, i))}">#${i} ${V.esc(fmtArgs(c))} → ${V.esc(shortResult(c))}</span>`,
            )
            .join("")
        : '<span class="muted">no tool calls</span>');
    document.querySelectorAll(".prog").forEach((el) => el.classList.toggle("selected", Number(el.dataset.pi) === sel));
  }

  // Boxes a rationale names, coloured as the call of its program that returned them.
  function rationaleBoxes(r) {
    const prog = Q.programs.find((p) => p.id === r.sample);
    const out = [];
    for (const m of r.text.matchAll(BOX_RE)) {
      const box = m.slice(1, 5).map(Number);
      if (box.some((v) => v < -0.01 || v > 1.01)) continue;
      let col = "#555";
      let image = 0;
      if (prog) {
        prog.trace.forEach((c, i) => {
          if (c.boxes && c.boxes.some((b) => b.every((v, t) => Math.abs(v - box[t]) < 0.006))) {
            col = color(i);
            image = c.image || 0;
          }
        });
      }
      out.push({ box, color: col, image, text: m[0] });
    }
    return out;
  }

  function markBoxes(r) {
    const boxes = rationaleBoxes(r);
    let bi = 0;
    return V.esc(r.text).replace(BOX_RE, (m) => {
      const b = boxes[bi];
      if (!b || b.text !== m) return m; // a bracket that is not a box in 0..1
      return `<span class="rbox" data-bi="${bi++}" style="--c:${b.color}">${m}</span>`;
    });
  }

  // ------------------------------------------------------------------ programs
  function attribute(trace, lines) {
    // Each call beside the line that makes it: among the lines calling its op, those that
    // also hold one of its string arguments ('small shape') first, then the first at or
    // after the previous call's line (then from the top: loops call again from an earlier
    // line). A call no line makes (a property read) goes under the program.
    const per = lines.map(() => []);
    const rest = [];
    let cur = 0;
    trace.forEach((c, i) => {
      const pats = [c.name + "("].concat(ALIAS[c.name] || []);
      const strs = Object.values(c.args || {}).filter((v) => typeof v === "string" && v);
      const calls = (l) => pats.some((p) => lines[l].includes(p));
      const named = (l) => calls(l) && strs.some((v) => lines[l].includes(v));
      let at = -1;
      for (const ok of strs.length ? [named, calls] : [calls]) {
        for (let l = cur; l < lines.length && at < 0; l++) if (ok(l)) at = l;
        for (let l = 0; l < cur && at < 0; l++) if (ok(l)) at = l;
        if (at >= 0) break;
      }
      if (at < 0) rest.push(i);
      else {
        per[at].push(i);
        cur = at;
      }
    });
    return { per, rest };
  }

  function chip(c, i) {
    return `<span class="chip" data-call="${i}" style="--c:${color(i)}" title="${V.esc(callTitle(c, i))}">#${i} ${V.esc(c.name)} → ${V.esc(shortResult(c))}</span>`;
  }

  function progCard(p, pi) {
    let verdict;
    if (p.kept === undefined) verdict = `<span class="muted">${p.src === "programs" ? "programs arm (no verdict)" : "not verified"}</span>`;
    else verdict = p.kept ? '<b class="ok">kept</b>' : '<b class="bad">dropped</b>';
    const lines = (p.program || "").replace(/\n+$/, "").split("\n");
    const { per, rest } = attribute(p.trace, lines);
    const rows = lines
      .map(
        (l, li) =>
          `<tr><td class="ln">${li + 1}</td><td class="src">${V.esc(l)}</td><td class="calls">${per[li].map((i) => chip(p.trace[i], i)).join("")}</td></tr>`,
      )
      .join("");
    const restRow = rest.length
      ? `<tr><td class="ln"></td><td class="src muted">(other calls)</td><td class="calls">${rest.map((i) => chip(p.trace[i], i)).join("")}</td></tr>`
      : "";
    const score = p.score === undefined || p.score === null ? "" : `<span>score ${Number(p.score).toFixed(2)}</span>`;
    const kind = p.kept === undefined ? "" : p.kept ? " kept" : " dropped";
    return (
      `<div class="card prog${kind}" data-pi="${pi}"><div class="phead" title="click: draw this program's calls on the image">` +
      `<b>#${V.esc(p.k)}</b><span class="st ${V.esc(p.status)}">${V.esc(p.status || "-")}</span>` +
      `<span>answer <b class="mono">${V.esc(p.answer === null ? "none" : p.answer)}</b></span>${score}${verdict}` +
      `<span class="reason">${V.esc(p.reason && p.reason !== "kept" ? p.reason : "")}</span><span class="muted">${p.trace.length} calls</span></div>` +
      `<table class="code">${rows}${restRow}</table>` +
      (p.error ? `<div class="perr">${V.esc(p.error)}</div>` : "") +
      `</div>`
    );
  }

  // ------------------------------------------------------------------ ratings
  function ratedAnswer(r) {
    if (r.answer !== undefined && r.answer !== null) return r.answer;
    const prog = Q.programs.find((p) => p.id === r.sample);
    if (prog) return prog.answer;
    const m = /answer is (.*?)\.?\s*$/i.exec(r.text);
    return m ? m[1] : null;
  }

  function rateWidget(r, ri) {
    const cur = V.ratings.get(r.id) || {};
    return (
      `<div class="rate">` +
      QS.map(
        ([c, t], qi) =>
          `<div class="rq" data-ri="${ri}" data-qi="${qi}">${t} ` +
          `<button data-v="1" class="${cur[c] === true ? "on" : ""}">yes <kbd>y</kbd></button> ` +
          `<button data-v="0" class="${cur[c] === false ? "on" : ""}">no <kbd>n</kbd></button></div>`,
      ).join("") +
      `</div>`
    );
  }

  function setRating(ri, qi, v) {
    const r = Q.rationales[ri];
    const rec = Object.assign(
      { answer_right: null, factual: null, consistent: null },
      V.ratings.get(r.id) || {},
      {
        id: r.id,
        qid: Q.id,
        source: r.source,
        type: Q.type,
        dataset: Q.dataset,
        answer: ratedAnswer(r),
        rationale: r.text,
        rater: V.rater(),
        time: new Date().toISOString(),
      },
    );
    rec[QS[qi][0]] = v;
    V.ratings.put(rec);
  }

  function firstOpen(ri) {
    const cur = V.ratings.get(Q.rationales[ri].id) || {};
    const qi = QS.findIndex(([c]) => cur[c] === undefined || cur[c] === null);
    return qi < 0 ? 0 : qi;
  }

  function showRatings() {
    document.querySelectorAll(".ratcard").forEach((card) => {
      const ri = Number(card.dataset.ri);
      const cur = V.ratings.get(Q.rationales[ri].id) || {};
      card.classList.toggle("active", ri === act.ri);
      card.querySelectorAll(".rq").forEach((row) => {
        const qi = Number(row.dataset.qi);
        row.classList.toggle("active", ri === act.ri && qi === act.qi);
        row.querySelectorAll("button").forEach((b) => {
          const want = b.dataset.v === "1";
          b.classList.toggle("on", cur[QS[qi][0]] === want);
        });
      });
    });
  }

  function answerKey(v) {
    setRating(act.ri, act.qi, v);
    if (act.qi < QS.length - 1) act.qi++;
    else if (act.ri < Q.rationales.length - 1) {
      act.ri++;
      act.qi = firstOpen(act.ri);
    }
    showRatings();
  }

  function bindRating() {
    document.getElementById("rationales").addEventListener("click", (e) => {
      const b = e.target.closest(".rq button");
      if (!b) return;
      const row = b.closest(".rq");
      act.ri = Number(row.dataset.ri);
      act.qi = Number(row.dataset.qi);
      answerKey(b.dataset.v === "1");
    });
    document.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
      const n = Q.rationales.length;
      if ((e.key === "y" || e.key === "n") && n) answerKey(e.key === "y");
      else if ((e.key === "j" || e.key === "ArrowDown") && act.ri < n - 1) act.qi = firstOpen(++act.ri);
      else if ((e.key === "k" || e.key === "ArrowUp") && act.ri > 0) act.qi = firstOpen(--act.ri);
      else if ((e.key === "]" || e.key === "ArrowRight") && Q.next_rate) location.href = V.qurl(Q.next_rate);
      else if ((e.key === "[" || e.key === "ArrowLeft") && Q.prev) location.href = V.qurl(Q.prev);
      else if (e.key === "e") V.ratings.exportFile();
      else return;
      e.preventDefault();
      showRatings();
    });
    V.ratings.onChange(showRatings);
    showRatings();
  }

  // ------------------------------------------------------------------ page
  function hover(e) {
    const t = e.target.closest("[data-call]");
    document.querySelectorAll(".hi").forEach((x) => x.classList.remove("hi"));
    document.querySelectorAll(".imgbox g.call").forEach((g) => g.classList.remove("dim"));
    tip.style.display = "none";
    if (t) {
      const i = t.dataset.call;
      const inSvg = t.tagName.toLowerCase() === "g";
      // A chip in another program's card names that program's call, not the drawn one.
      const card = t.closest(".prog");
      if (card && Number(card.dataset.pi) !== sel) return;
      document.querySelectorAll(`[data-call="${i}"]`).forEach((x) => x.classList.add("hi"));
      document.querySelectorAll(".imgbox g.call").forEach((g) => g.classList.toggle("dim", g.dataset.call !== i));
      if (inSvg) {
        const c = Q.programs[sel].trace[Number(i)];
        tip.textContent = callTitle(c, i);
        tip.style.display = "block";
        tip.style.left = e.clientX + 14 + "px";
        tip.style.top = e.clientY + 14 + "px";
      }
    }
    const rb = e.target.closest(".rbox");
    const rc = e.target.closest(".ratcard");
    document.querySelectorAll("g.rat").forEach((g) => g.classList.toggle("show", !!rc && g.dataset.ri === rc.dataset.ri));
    if (rb && rc) {
      document
        .querySelectorAll(`g.rat[data-ri="${rc.dataset.ri}"] rect[data-bi="${rb.dataset.bi}"]`)
        .forEach((x) => x.classList.add("hi"));
    }
  }

  function render() {
    document.title = `${Q.id} · vpd view`;
    const gold = Q.answers.length ? Q.answers.map((a) => `<b class="mono">${V.esc(a)}</b>`).join(", ") : '<span class="muted">none</span>';
    const two = Q.images.length > 1;
    const nav = [
      Q.prev ? `<a href="${V.qurl(Q.prev)}">← previous</a>` : "",
      Q.next ? `<a href="${V.qurl(Q.next)}">next →</a>` : "",
      META.rate && Q.next_rate ? `<a id="nextrate" href="${V.qurl(Q.next_rate)}">next to rate ⇥</a>` : "",
      '<a href="questions.html">all questions</a>',
    ];
    const arms = Object.entries(Q.arms)
      .map(([a, p]) => {
        const s = p.score;
        const mark = s === null || s === undefined ? '<span class="muted">unscored</span>' : s >= 0.5 ? `<span class="ok">✓ ${s.toFixed(2)}</span>` : `<span class="bad">✗ ${s.toFixed(2)}</span>`;
        return `<tr><th>${V.esc(a)}</th><td class="mono">${V.esc(p.prediction)}</td><td>${mark}</td></tr>`;
      })
      .join("");
    main.innerHTML =
      `<div class="qhead"><h1>${V.esc(Q.question)}</h1>` +
      `<div class="muted"><span class="mono">${V.esc(Q.id)}</span> · ${V.esc(Q.type)} · ${V.esc(Q.dataset)} ${V.esc(Q.split)} · gold: ${gold}</div>` +
      `<div class="qnav">${nav.join("")}</div></div>` +
      `<section class="top"><div class="images">` +
      Q.images
        .map(
          (src, j) =>
            `<figure><div class="imgbox${two ? " two" : ""}" data-img="${j}"><img src="${V.esc(src)}" alt="image ${j}">` +
            `<svg viewBox="0 0 1000 1000" preserveAspectRatio="none"></svg></div>` +
            `<div class="imgcap">${two ? (j ? "right image" : "left image") : ""}</div></figure>`,
        )
        .join("") +
      `</div><div><div class="card"><b>Arms</b>` +
      (arms ? `<table class="arms">${arms}</table>` : '<div class="muted">no evaluated arm answered this question</div>') +
      `</div><div class="card legend" id="legend"></div></div></section>` +
      `<h2>Rationales</h2><div id="rationales">` +
      (Q.rationales.length
        ? Q.rationales
            .map(
              (r, ri) =>
                `<div class="card ratcard" data-ri="${ri}"><div class="muted">${r.source === "sft" ? "from program " + V.esc(r.sample || "") : V.esc(r.source.replace("arm:", "the ") + " arm's own")}</div>` +
                `<div class="rat">${markBoxes(r)}</div>${META.rate ? rateWidget(r, ri) : ""}</div>`,
            )
            .join("")
        : '<p class="muted">no rationale for this question</p>') +
      `</div>` +
      (META.rate
        ? '<p class="keys"><kbd>y</kbd>/<kbd>n</kbd> answer the outlined question · <kbd>j</kbd>/<kbd>k</kbd> next/previous rationale · <kbd>→</kbd> next question to rate · <kbd>←</kbd> previous · <kbd>e</kbd> export</p>'
        : "") +
      `<h2>Programs (${Q.programs.length})</h2><div id="programs">` +
      (Q.programs.length ? Q.programs.map(progCard).join("") : '<p class="muted">no programs for this question</p>') +
      `</div>`;
    // Draw the first kept program, else the first that ran, else the first.
    const pick = (f) => Q.programs.findIndex(f);
    sel = [pick((p) => p.kept), pick((p) => p.status === "ok"), 0].find((i) => i >= 0) || 0;
    draw();
    document.getElementById("programs").addEventListener("click", (e) => {
      const h = e.target.closest(".phead");
      if (!h) return;
      sel = Number(h.parentElement.dataset.pi);
      draw();
    });
    main.addEventListener("mouseover", hover);
    main.addEventListener("mousemove", (e) => {
      if (tip.style.display === "block") {
        tip.style.left = e.clientX + 14 + "px";
        tip.style.top = e.clientY + 14 + "px";
      }
    });
    if (META.rate) {
      if (Q.rationales.length) act.qi = firstOpen(0);
      bindRating();
    }
    window.VPD_READY = true;
  }

  V.header("question");
  window.VPD_SHARD = function (recs) {
    Q = recs[qid];
    if (!Q) {
      main.innerHTML = `<p class="bad">question ${V.esc(qid)} is not in this site</p>`;
      window.VPD_READY = true;
      return;
    }
    render();
  };
  if (!qid) {
    main.innerHTML = '<p>no question id: open a question from <a href="questions.html">the index</a></p>';
    window.VPD_READY = true;
  } else {
    const s = document.createElement("script");
    s.src = V.shardFile(qid);
    s.onerror = () => {
      main.innerHTML = `<p class="bad">could not load ${V.esc(s.src)}</p>`;
      window.VPD_READY = true;
    };
    document.body.appendChild(s);
  }
})(window.VPD);
