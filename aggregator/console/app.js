// Sign-in, routing (#/sites, #/jobs, #/jobs/<id>) and polling. The role comes from /api/v1/me; admin-only
// buttons are disabled for viewers, and the API refuses their requests anyway.
import { ApiError, api, explain, token } from "./api.js";
import { h } from "./dom.js";
import { jobView, jobsView, sitesView } from "./views.js";

const POLL_MS = 1500;
const main = document.getElementById("main");
const banner = document.getElementById("banner");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const signout = document.getElementById("signout");
let me = null;
let view = null;
let busy = false;

function showBanner(message, kind = "error") {
  banner.className = kind === "error" ? "banner" : "banner info";
  banner.textContent = message;
  banner.hidden = false;
}
const clearBanner = () => { banner.hidden = true; };

function handle(err) {
  if (err instanceof ApiError && err.status === 401) {
    token.clear();
    me = null;
    showLogin(explain(err));
  } else {
    showBanner(explain(err));
  }
}

async function refresh() {
  if (!view || busy) return;
  busy = true;
  const current = view;
  try {
    await current.refresh();
    if (current === view) clearBanner();
  } catch (err) {
    if (current === view) handle(err);
  } finally {
    busy = false;
  }
}

function route() {
  if (!me) return showLogin();
  const hash = location.hash || "#/sites";
  const ctx = { admin: me.role === "admin", refresh };
  const job = hash.match(/^#\/jobs\/(.+)$/);
  view = job ? jobView(ctx, decodeURIComponent(job[1])) : hash.startsWith("#/jobs") ? jobsView(ctx) : sitesView(ctx);
  const section = job || hash.startsWith("#/jobs") ? "jobs" : "sites";
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("active", a.dataset.view === section);
  main.replaceChildren();
  view.mount(main);
  refresh();
}

async function signIn(value) {
  if (value !== undefined) {
    if (value) token.set(value);
    else token.clear();
  }
  try {
    me = await api("/api/v1/me");
  } catch (err) {
    token.clear();
    me = null;
    showLogin(explain(err));
    return;
  }
  clearBanner();
  nav.hidden = false;
  signout.hidden = false;
  who.textContent = `${me.name} (${me.role})`;
  route();
}

function showLogin(message) {
  view = null;
  nav.hidden = true;
  signout.hidden = true;
  who.textContent = "";
  if (message) showBanner(message);
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true,
                             placeholder: "operator token" });
  main.replaceChildren(h("div", { class: "card login" },
    h("h1", {}, "Sign in"),
    h("form", { onsubmit: (event) => { event.preventDefault(); signIn(input.value.trim()); } },
      h("label", { for: "token" }, "Operator token"), input,
      h("p", { class: "muted" }, "Create one with ", h("code", {}, "fedsilo operator token NAME --role viewer|admin"),
        "; it is kept in this tab only (sessionStorage)."),
      h("div", { class: "row" },
        h("button", { type: "submit", id: "signin" }, "Sign in"),
        h("button", { type: "button", class: "secondary", id: "use-certificate", onclick: () => signIn("") },
          "Use my client certificate")))));
  input.focus();
}

signout.addEventListener("click", () => {
  token.clear();
  me = null;
  showLogin();
  showBanner("Signed out.", "info");
});
window.addEventListener("hashchange", () => { if (me) route(); });
setInterval(refresh, POLL_MS);
if (token.get()) signIn();
else showLogin();
