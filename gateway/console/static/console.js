// The console's only script (CSP: script-src 'self'). Pages work without it; it only makes
// selects marked data-autosubmit submit their form when changed by keyboard or mouse, and puts
// the focus on the first error message so screen readers announce it.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.requestSubmit());
  }
  const error = document.querySelector("[role=alert]");
  if (error) {
    error.setAttribute("tabindex", "-1");
    error.focus();
  }
});
