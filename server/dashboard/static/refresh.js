// Reload the page every N seconds (the page's edgefl-refresh meta), unless the user is
// typing into a form: a half-written command must not be lost to a refresh.
(function () {
  var meta = document.querySelector('meta[name="edgefl-refresh"]');
  var seconds = meta ? parseInt(meta.getAttribute("content"), 10) : 0;
  if (!(seconds > 0)) return;
  function busy() {
    var el = document.activeElement;
    if (el && /^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName)) return true;
    var fields = document.querySelectorAll("form input:not([type=hidden]), form textarea");
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].value && fields[i].value !== fields[i].defaultValue) return true;
    }
    return false;
  }
  setInterval(function () { if (!busy()) window.location.reload(); }, seconds * 1000);
})();
