// dockyard's status page: follow /ui/events/stream and refresh what the server rendered
// and escaped when something changes: every [data-fragment] element (the deployments, the
// chart, each plugin's panel, a plugin page's body) is re-fetched whole; the timeline
// ([data-append]) gets its new <li>s from /ui/fragments/timeline?after=N. Nothing here knows
// a panel or an event kind; this script never turns event text into markup itself.
"use strict";

(function () {
  const body = document.body;
  const page = body.dataset.page;
  if (page === "login") return;
  const live = document.getElementById("live");
  const timeline = document.querySelector("[data-append]");
  let pending = null;

  async function fetchHtml(url) {
    const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) { window.location = "/ui/login"; throw new Error("logged out"); }
    return r.ok ? await r.text() : null;
  }

  async function appendToTimeline() {
    const newest = timeline.querySelector("li[data-id]");
    const after = newest ? Number(newest.dataset.id) : Number(body.dataset.lastId || 0);
    const html = await fetchHtml(timeline.dataset.append + "?after=" + after);
    if (html === null) return;
    const parsed = document.createElement("template");
    parsed.innerHTML = html; // rendered and escaped by the server
    const items = [...parsed.content.querySelectorAll("li[data-id]")].reverse(); // oldest first
    for (const li of items) {
      if (timeline.querySelector('[data-id="' + Number(li.dataset.id) + '"]')) continue;
      li.classList.add("new");
      timeline.prepend(li);
    }
    while (timeline.children.length > 200) timeline.lastElementChild.remove();
  }

  async function refresh() {
    pending = null;
    try {
      if (timeline) await appendToTimeline();
      for (const el of document.querySelectorAll("[data-fragment]")) {
        const html = await fetchHtml(el.dataset.fragment);
        if (html === null) continue;
        el.innerHTML = html; // rendered and escaped by the server
      }
    } catch (err) {
      /* logged out, or offline: the stream's reconnect will bring us back */
    }
    body.dataset.refreshed = String(Date.now());
  }

  function schedule() {
    if (pending === null) pending = setTimeout(refresh, 250);
  }

  // A page may follow part of the stream (data-stream-query, built by the server); the
  // index follows everything after what it rendered.
  const query = body.dataset.streamQuery || "after=" + Number(body.dataset.lastId || 0);
  const source = new EventSource("/ui/events/stream?" + query);
  source.onopen = function () { live.textContent = "live"; live.className = "live on"; };
  source.onerror = function () { live.textContent = "reconnecting"; live.className = "live off"; };
  source.onmessage = function (message) {
    let e;
    try { e = JSON.parse(message.data); } catch (err) { return; }
    body.dataset.lastEvent = String(e.id);
    schedule();
  };
})();
