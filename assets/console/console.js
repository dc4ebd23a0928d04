// keymeter console enhancements. Everything works without this file; it only adds:
// - a copy button next to a newly shown key;
// - times in the browser's own zone (the server writes them in UTC).
"use strict";
document.documentElement.classList.add("js");

function copyFrom(button) {
  var field = document.getElementById(button.getAttribute("data-copy"));
  if (!field) return;
  var done = function () {
    button.textContent = "Copied";
    button.setAttribute("aria-live", "polite");
  };
  var fallback = function () {
    field.focus();
    field.select();
    try { if (document.execCommand("copy")) { done(); return; } } catch (e) { /* below */ }
    button.textContent = "Press Ctrl+C to copy";
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(done, fallback);
  } else {
    fallback();
  }
}

function localTimes() {
  var opts = { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" };
  document.querySelectorAll("time[datetime]").forEach(function (t) {
    var d = new Date(t.getAttribute("datetime"));
    if (isNaN(d.getTime())) return;
    t.setAttribute("title", t.textContent);
    t.textContent = d.toLocaleString(undefined, opts);
  });
}

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("button[data-copy]").forEach(function (b) {
    b.addEventListener("click", function () { copyFrom(b); });
  });
  localTimes();
});
