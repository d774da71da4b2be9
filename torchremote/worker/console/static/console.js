// Keeps the page live: fetches this page's part again twice a second and swaps it in, unless the
// owner is typing into it (a denial's reason). The server renders and escapes everything.
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live) return;
  let last = null;
  function typing() {
    const active = document.activeElement;
    if (active && live.contains(active) && active.tagName === "INPUT") return true;
    return Array.from(live.querySelectorAll("input[type=text]")).some((i) => i.value !== "");
  }
  async function refresh() {
    if (typing()) return;
    try {
      const response = await fetch(live.dataset.fragment, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) { window.location.assign("/login"); return; }
      if (!response.ok) return;
      const body = await response.text();
      if (body !== last && !typing()) { last = body; live.innerHTML = body; }
    } catch (e) { /* the worker is restarting, say: try again at the next tick */ }
  }
  setInterval(refresh, 500);
})();
