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

  // Reloads the table of mails from the server until no mail is queued or sending. Only the
  // module's own table part is taken: a sign-in page (the session ended) or an error stops it.
  // `now`: the first reload at once (after a send: the new mail is listed without waiting).
  function watch(part, now) {
    if (!part || part.dataset.watching === "1") return;
    part.dataset.watching = "1";
    // A newer watch (after another Send) replaces this one: only one loop asks at a time.
    var round = String(parseInt(part.dataset.round || "0", 10) + 1);
    part.dataset.round = round;
    var delay = POLL_MS;
    function stop(words) {
      part.dataset.watching = "";
      if (words) {
        var note = document.createElement("p");
        note.className = "help";
        note.textContent = words;
        part.appendChild(note);
      }
    }
    function tick() {
      if (part.dataset.round !== round) return;
      fetch(part.dataset.src, { credentials: "same-origin", cache: "no-store", redirect: "manual" })
        .then(function (r) {
          if (r.type === "opaqueredirect" || r.status === 401 || r.status === 403) return "signed-out";
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (part.dataset.round !== round) return;
          if (html === "signed-out") {
            stop("Sign in again to see the statuses update.");
            return;
          }
          var fresh = null;
          if (html !== null) {
            var holder = document.createElement("div");
            holder.innerHTML = html;
            fresh = holder.querySelector(".mails-part");
          }
          if (!fresh) {
            stop("The statuses could not be updated: reload the page to see them.");
            return;
          }
          part.innerHTML = fresh.innerHTML;
          if (pending(part)) {
            // A mail that waits on its mailbox may wait long: ask less often as time goes on.
            delay = Math.min(delay * 1.25, 15000);
            setTimeout(tick, delay);
          } else {
            stop(null);
          }
        })
        .catch(function () { setTimeout(tick, POLL_MS * 4); });
    }
    setTimeout(tick, now ? 0 : delay);
  }

  function sizeWords(n) {
    if (n < 1000) return n + " bytes";
    if (n < 1000000) return Math.floor(n / 1000) + " KB";
    return (n / 1000000).toFixed(1) + " MB";
  }

  // The files' total against the limit, before anything is sent (the server checks again).
  function filesTooLarge(form) {
    var input = form.querySelector('[name="attachments"]');
    var max = parseInt(form.dataset.maxFileBytes || "0", 10);
    if (!input || !input.files || !max) return null;
    var total = 0;
    for (var i = 0; i < input.files.length; i += 1) {
      total += input.files[i].size;
      if (total > max) {
        return "\"" + input.files[i].name + "\" brings the attachments to " + sizeWords(total) +
          "; the limit is " + sizeWords(max) + " per mail";
      }
    }
    return null;
  }

  function send(form, event) {
    event.preventDefault();
    var button = form.querySelector('button[type="submit"]');
    var status = form.querySelector("[data-compose-status]");
    var part = document.querySelector(form.dataset.mails);
    clearErrors(form);
    status.hidden = true;
    var tooLarge = filesTooLarge(form);
    if (tooLarge) {
      showErrors(form, [{ field: "attachments", message: tooLarge }]);
      return;
    }
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
          // Every field back to what the page gave it (To: the record's address; Cc empty),
          // so that the next mail does not silently go to this one's other recipients.
          form.reset();
          var again = form.querySelector(".files-again");
          if (again) again.remove();
          if (part) { part.dataset.watching = ""; watch(part, true); }
        } else if (answer.body && answer.body.errors) {
          showErrors(form, answer.body.errors);
        } else {
          showErrors(form, [{ field: "general", message: "The CRM did not answer as expected (HTTP " + answer.status + "). The mail may have been queued: check the list of mails below before sending again. Your text is still here." }]);
          if (part) { part.dataset.watching = ""; watch(part); }
        }
      })
      .catch(function () {
        showErrors(form, [{ field: "general", message: "The CRM could not be reached. The mail may have been queued: check the list of mails below before sending again. Your text is still here." }]);
        if (part) { part.dataset.watching = ""; watch(part); }
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
