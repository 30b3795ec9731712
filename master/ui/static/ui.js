/* Keg web UI: live updates by the watch stream, sortable tables, confirmations.
 * Hand-written, no framework, no build step. Pages work without it; it only adds.
 */
(function () {
  "use strict";

  var body = document.body;
  var indicator = document.getElementById("live");

  function setLive(state, text) {
    if (!indicator) { return; }
    indicator.setAttribute("data-state", state);
    indicator.textContent = text;
  }

  /* ---------------------------------------------------------------- live */

  function editing() {
    var active = document.activeElement;
    var main = document.getElementById("main");
    if (main && main.querySelector("form[data-editing]")) { return true; }
    return !!(active && main && main.contains(active) &&
              /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName) && active.type !== "checkbox");
  }

  function followLogs() {
    var follow = document.getElementById("follow");
    if (follow && !follow.checked) { return; }
    var logs = document.querySelectorAll("pre[data-follow]");
    for (var i = 0; i < logs.length; i++) { logs[i].scrollTop = logs[i].scrollHeight; }
  }

  function keptState(root) {
    var kept = {};
    var inputs = root.querySelectorAll("input[data-keep]");
    for (var i = 0; i < inputs.length; i++) { kept[inputs[i].id] = inputs[i].checked; }
    return kept;
  }

  var refreshing = false;
  var again = false;
  var refreshTimer = null;
  var lastCost = 0;   // ms the last refresh took: a heavy page (a big dashboard) refreshes less often
  var revision = body.getAttribute("data-since");

  function showStale() {
    var main = document.getElementById("main");
    if (!main || document.getElementById("stale")) { return; }
    var box = document.createElement("div");
    box.id = "stale";
    box.className = "notice warn";
    box.setAttribute("role", "status");
    box.appendChild(document.createTextNode("This value changed at revision " + revision + " while you were here. "));
    var a = document.createElement("a");
    a.href = location.href;
    a.textContent = "Reload to see it";
    box.appendChild(a);
    main.insertBefore(box, main.firstChild);
  }

  function refresh() {
    if (refreshing) { again = true; return; }
    if (editing()) { showStale(); return; }
    refreshing = true;
    var started = Date.now();
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) { return response.text(); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("main");
        var main = document.getElementById("main");
        if (!fresh || !main || editing()) { return; }
        var kept = keptState(main);
        var focusedId = document.activeElement && document.activeElement.id;
        main.innerHTML = fresh.innerHTML;
        Object.keys(kept).forEach(function (id) {
          var input = document.getElementById(id);
          if (input) { input.checked = kept[id]; }
        });
        if (focusedId) {
          var again_focus = document.getElementById(focusedId);
          if (again_focus) { again_focus.focus(); }
        }
        document.title = doc.title;
        body.setAttribute("data-refreshed", revision);
        followLogs();
      })
      .catch(function () { /* the stream's own error handler shows the state */ })
      .then(function () {
        refreshing = false;
        lastCost = Date.now() - started;
        if (again) { again = false; schedule(); }
      });
  }

  function schedule() {
    if (refreshTimer) { return; }
    refreshTimer = setTimeout(function () { refreshTimer = null; refresh(); }, Math.max(100, 2 * lastCost));
  }

  function watch(prefix) {
    var delay = 1000;
    var source = null;

    function connect() {
      var url = "/v1/watch?format=sse&prefix=" + encodeURIComponent(prefix) + "&since=" + encodeURIComponent(revision);
      source = new EventSource(url);
      source.onopen = function () {
        delay = 1000;
        setLive("live", "Live");
      };
      source.addEventListener("change", function (event) {
        if (event.lastEventId) { revision = event.lastEventId; }
        schedule();
      });
      source.onerror = function () {
        // Reconnect ourselves, from the last revision seen, so that nothing is missed or repeated.
        source.close();
        setLive("down", "Disconnected: reconnecting…");
        setTimeout(connect, delay);
        delay = Math.min(delay * 2, 15000);
      };
    }
    connect();
  }

  var prefix = body.getAttribute("data-watch");
  if (prefix !== null && revision !== null && window.EventSource && window.fetch) {
    watch(prefix);
  }
  followLogs();

  /* ------------------------------------------------------------- sorting */

  function cellValue(row, index) {
    var cell = row.cells[index];
    return cell ? cell.textContent.trim() : "";
  }

  function sortTable(button) {
    var th = button.parentNode;
    var table = th.closest("table");
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    var numeric = rows.every(function (r) {
      var v = cellValue(r, index);
      return v === "" || v === "—" || !isNaN(parseFloat(v.replace(/,/g, "")));
    });
    rows.sort(function (a, b) {
      var x = cellValue(a, index), y = cellValue(b, index);
      var order;
      if (numeric) {
        order = (parseFloat(x.replace(/,/g, "")) || 0) - (parseFloat(y.replace(/,/g, "")) || 0);
      } else {
        order = x.localeCompare(y, undefined, { numeric: true });
      }
      return ascending ? order : -order;
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    var heads = th.parentNode.children;
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute("aria-sort"); }
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("th > button.sort");
    if (button) { sortTable(button); }
  });

  /* -------------------------------------------------------- confirmation */

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });
})();
