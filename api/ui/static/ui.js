// dockyard's status page: follow /ui/events/stream and refresh the server-rendered,
// server-escaped fragments when something changes. Text from events is only ever put in
// the page with textContent, never as markup.
"use strict";

(function () {
  const body = document.body;
  const page = body.dataset.page;
  if (page === "login") return;
  const live = document.getElementById("live");
  const timeline = document.getElementById("timeline");
  const evaluationId = body.dataset.evaluation || "";
  let pending = null;

  function clock(at) {
    const d = new Date(at * 1000);
    return d.toTimeString().slice(0, 8);
  }

  function describe(e) {
    if (e.kind === "slot_transition") return e.from_state + " \u2192 " + e.to_state;
    if (e.kind === "evaluation") return "evaluation " + (e.data && e.data.state);
    return e.kind.replace(/_/g, " ");
  }

  function span(cls, text) {
    const s = document.createElement("span");
    s.className = cls;
    s.textContent = text;
    return s;
  }

  function addToTimeline(e) {
    if (!timeline || timeline.querySelector('[data-id="' + Number(e.id) + '"]')) return;
    const li = document.createElement("li");
    li.className = "event new kind-" + String(e.kind).replace(/[^a-z_]/g, "");
    li.dataset.id = String(Number(e.id));
    const time = document.createElement("time");
    time.textContent = clock(e.at);
    li.append(time, " ", span("dep", e.deployment_id));
    if (e.color) li.append(" ", span("color " + (e.color === "green" ? "green" : "blue"), e.color));
    li.append(" ", span("what", describe(e)));
    const msg = [e.reason, e.message].filter(Boolean).join(" ");
    if (msg) li.append(" ", span("msg", msg));
    timeline.prepend(li);
    while (timeline.children.length > 200) timeline.lastElementChild.remove();
  }

  async function refresh() {
    pending = null;
    for (const el of document.querySelectorAll("[data-fragment]")) {
      try {
        const r = await fetch(el.dataset.fragment, { credentials: "same-origin", cache: "no-store" });
        if (r.status === 401) { window.location = "/ui/login"; return; }
        if (r.ok) el.innerHTML = await r.text(); // rendered and escaped by the server
      } catch (err) {
        /* the stream's reconnect will bring us back */
      }
    }
    body.dataset.refreshed = String(Date.now());
  }

  function schedule() {
    if (pending === null) pending = setTimeout(refresh, 250);
  }

  let url = "/ui/events/stream?after=" + Number(body.dataset.lastId || 0);
  if (evaluationId) url = "/ui/events/stream?evaluation=" + encodeURIComponent(evaluationId);
  const source = new EventSource(url);
  source.onopen = function () { live.textContent = "live"; live.className = "live on"; };
  source.onerror = function () { live.textContent = "reconnecting"; live.className = "live off"; };
  source.onmessage = function (message) {
    let e;
    try { e = JSON.parse(message.data); } catch (err) { return; }
    body.dataset.lastEvent = String(e.id);
    addToTimeline(e);
    schedule();
  };
})();
