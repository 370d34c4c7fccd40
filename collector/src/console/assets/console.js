// gpumeter console: the pages' live figures. Served by the collector itself (script-src
// 'self'); it reads the hub's frames from /live (Server-Sent Events) and updates the elements
// that name a card (data-card="UUID"), a host (data-host="HOST") or a grant
// (data-grant="ID"). The page's data-live-view says what its stream carries: every card's
// figures (the default), the grants' alone, or the grants and each host's connection state.
// It never sends anything but the subscription.
"use strict";
(function () {
  var root = document.querySelector("[data-live]");
  if (!root || !window.EventSource) { return; }
  var dot = document.getElementById("live-dot");
  var hosts = {};
  function text(el, v) { if (el) { el.textContent = v; } }
  function setState(el, state) {
    if (!el) { return; }
    var old = el.getAttribute("data-state");
    if (old) { el.classList.remove(old); }
    el.classList.add("state", state);
    el.textContent = el.getAttribute("data-label-" + state) || state;
    el.setAttribute("data-state", state);
  }
  function fmt(v, unit, digits) {
    return (v === null || v === undefined) ? "–" : v.toFixed(digits) + unit;
  }
  function onCard(c) {
    document.querySelectorAll('[data-card="' + CSS.escape(c.uuid) + '"]').forEach(function (row) {
      setState(row.querySelector(".state"), c.state);
      text(row.querySelector(".live-util"), fmt(c.util, "%", 1));
      text(row.querySelector(".live-power"), fmt(c.power, " W", 0));
      text(row.querySelector(".live-end"), c.end_kst);
      row.setAttribute("data-window-end", String(c.end));
    });
    if (c.host) {
      var h = hosts[c.host] || (hosts[c.host] = {});
      h[c.uuid] = c.connected;
    }
  }
  function setHost(host, connected) {
    document.querySelectorAll('[data-host="' + CSS.escape(host) + '"] .conn').forEach(function (el) {
      setState(el, connected ? "connected" : "disconnected");
    });
  }
  function onHosts() {
    Object.keys(hosts).forEach(function (host) {
      setHost(host, Object.keys(hosts[host]).some(function (k) { return hosts[host][k]; }));
    });
  }
  function onGrant(g) {
    document.querySelectorAll('[data-grant="' + CSS.escape(g.id) + '"]').forEach(function (row) {
      text(row.querySelector(".live-reporting"), g.reporting + "/" + g.cards);
      text(row.querySelector(".live-idle"), String(g.idle));
      text(row.querySelector(".live-violating"), String(g.violating));
    });
  }
  var q = [];
  ["view", "program", "grant", "host"].forEach(function (k) {
    var v = root.getAttribute("data-live-" + k);
    if (v) { q.push(k + "=" + encodeURIComponent(v)); }
  });
  var es = new EventSource("/live" + (q.length ? "?" + q.join("&") : ""));
  es.addEventListener("open", function () { if (dot) { dot.className = "live-dot on"; } });
  es.addEventListener("error", function () { if (dot) { dot.className = "live-dot"; } });
  es.addEventListener("fleet", function (e) {
    var f = JSON.parse(e.data);
    if (f.snapshot) { hosts = {}; }
    (f.cards || []).forEach(onCard);
    (f.grants || []).forEach(onGrant);
    onHosts();
    // The fleet page's stream ("view=hosts") names each host's state itself.
    (f.hosts || []).forEach(function (h) { setHost(h.host, h.connected); });
    root.setAttribute("data-live-version", String(f.version));
  });
})();
