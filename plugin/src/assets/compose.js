// The compose box: sends the form without leaving the page, shows each error beside its field
// with everything typed kept, says where the mail goes out from, and updates the statuses of
// the record's mails in place until none is queued or sending.
// Served as a file: the Content-Security-Policy allows no inline script.
"use strict";
(function () {
  var POLL_MS = 1500;

  function errorBox(form, field) {
    return form.querySelector('[data-error-for="' + field + '"]') ||
      form.querySelector('[data-error-for="general"]');
  }

  function clearErrors(form) {
    form.querySelectorAll("[data-error-for]").forEach(function (el) {
      el.textContent = "";
      el.hidden = true;
    });
  }

  function fieldFor(name) {
    if (/_body$/.test(name)) return "markdown_body";
    return name;
  }

  function showErrors(form, errors) {
    errors.forEach(function (e) {
      var box = errorBox(form, fieldFor(e.field));
      if (!box) return;
      if (box.textContent) box.appendChild(document.createElement("br"));
      box.appendChild(document.createTextNode(e.message));
      box.hidden = false;
    });
    var first = form.querySelector("[data-error-for]:not([hidden])");
    if (first) {
      var input = first.previousElementSibling;
      if (input && input.focus && /^(INPUT|TEXTAREA)$/.test(input.tagName)) input.focus();
    }
  }

  function pending(part) {
    return part.querySelector('tr[data-status="queued"], tr[data-status="sending"]') !== null;
  }

  // Reloads the table of mails from the server until no mail is queued or sending.
  function watch(part) {
    if (!part || part.dataset.watching === "1") return;
    part.dataset.watching = "1";
    function tick() {
      fetch(part.dataset.src, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html !== null) {
            var holder = document.createElement("div");
            holder.innerHTML = html;
            var fresh = holder.firstElementChild;
            if (fresh) part.innerHTML = fresh.innerHTML;
          }
          if (pending(part)) {
            setTimeout(tick, POLL_MS);
          } else {
            part.dataset.watching = "";
          }
        })
        .catch(function () { setTimeout(tick, POLL_MS * 4); });
    }
    setTimeout(tick, POLL_MS);
  }

  function send(form, event) {
    event.preventDefault();
    var button = form.querySelector('button[type="submit"]');
    var status = form.querySelector("[data-compose-status]");
    var part = document.querySelector(form.dataset.mails);
    clearErrors(form);
    status.hidden = true;
    button.disabled = true;
    var label = button.textContent;
    button.textContent = "Sending…";
    var token = form.querySelector('input[name="csrf_token"]');
    fetch(form.action, {
      method: "POST",
      body: new FormData(form),
      credentials: "same-origin",
      headers: { "Accept": "application/json", "X-CSRF-Token": token ? token.value : "" }
    })
      .then(function (r) {
        return r.json().then(
          function (body) { return { status: r.status, body: body }; },
          function () { return { status: r.status, body: null }; }
        );
      })
      .then(function (answer) {
        if (answer.status === 201 && answer.body) {
          status.textContent = answer.body.confirmation;
          status.hidden = false;
          form.querySelector('[name="subject"]').value = "";
          form.querySelector('[name="markdown_body"]').value = "";
          var files = form.querySelector('[name="attachments"]');
          if (files) files.value = "";
          var again = form.querySelector(".files-again");
          if (again) again.remove();
          if (part) { part.dataset.watching = ""; watch(part); }
        } else if (answer.body && answer.body.errors) {
          showErrors(form, answer.body.errors);
        } else {
          showErrors(form, [{ field: "general", message: "The CRM did not answer as expected (HTTP " + answer.status + "). Nothing was queued and your text is still here: send again." }]);
        }
      })
      .catch(function () {
        showErrors(form, [{ field: "general", message: "The CRM could not be reached. Nothing was queued and your text is still here: send again when the connection is back." }]);
      })
      .then(function () {
        button.disabled = false;
        button.textContent = label;
      });
  }

  function init() {
    document.querySelectorAll("form[data-compose]").forEach(function (form) {
      if (form.dataset.ready === "1") return;
      form.dataset.ready = "1";
      form.addEventListener("submit", function (event) { send(form, event); });
      var part = document.querySelector(form.dataset.mails);
      if (part && pending(part)) watch(part);
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
