// The console's three views. Each mounts its static parts once and redraws its data on every `refresh()`.
import { api, explain } from "./api.js";
import { lineChart } from "./chart.js";
import { ago, badge, h, iso, num, table } from "./dom.js";

const ENDED = new Set(["finished", "failed", "cancelled"]);
const KNOWN_SITE_KEYS = new Set(["site", "state", "at"]);
const jobLink = (id) => h("a", { href: `#/jobs/${encodeURIComponent(id)}` }, id);
const needsAdmin = "needs an admin token (you are signed in as a viewer)";
// Every ε is shown with its unit: per patient record (record-level DP-SGD) or per site (update-level DP); with
// secure aggregation, beside it, what a site's own share of the noise guarantees alone.
const UNIT_WORDS = {
  record: "per patient", site: "per site",
  record_alone: "per patient, own noise alone", site_alone: "per site, own noise alone",
};
const epsilonText = (eps, unit) => `ε ${num(eps, 2)} ${UNIT_WORDS[unit] ?? unit}`;

function details(row) {
  // Whatever else a site's status row carries, shown as it is: the console assumes no further keys.
  return Object.entries(row)
    .filter(([key, value]) => !KNOWN_SITE_KEYS.has(key) && value !== null && value !== "")
    .map(([key, value]) => `${key}: ${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(" · ");
}

export function sitesView() {
  const body = h("div");
  return {
    mount(root) {
      root.append(h("h1", {}, "Sites"), body);
    },
    async refresh() {
      const [sites, decisions, quarantined] = await Promise.all(
        [api("/api/v1/sites"), api("/api/v1/decisions"), api("/api/v1/quarantine")]);
      const names = [...new Set([...sites.map((s) => s.site), ...decisions.map((d) => d.site)])].sort();
      const rows = names.map((name) => {
        const site = sites.find((s) => s.site === name) || { site: name };
        const mine = decisions.filter((d) => d.site === name);
        const accepted = mine.filter((d) => d.decision === "accepted" || d.decision === "stopped");
        const refused = mine.filter((d) => d.decision === "refused");
        const spent = mine.filter((d) => typeof d.epsilon_spent === "number");
        const totals = {};  // one sum per unit: ε per patient and ε per site never add up
        spent.forEach((d) => { totals[d.epsilon_unit] = (totals[d.epsilon_unit] || 0) + d.epsilon_spent; });
        return h("tr", { "data-site": name },
          h("td", {}, h("strong", {}, name)),
          h("td", {}, site.state ? badge(site.state) : h("span", { class: "muted" }, "never seen")),
          h("td", { title: iso(site.at) }, ago(site.at)),
          h("td", { class: "num" }, String(accepted.length),
            accepted.length ? h("div", { class: "muted" }, accepted.map((d, i) => [i ? ", " : "", jobLink(d.job_id)])) : null),
          h("td", { class: "num" }, String(refused.length),
            refused.length ? h("ul", { class: "reasons" }, refused.map((d) =>
              h("li", {}, jobLink(d.job_id), ": ", d.reasons.join("; ") || "no reason given"))) : null),
          h("td", { class: "num", title: spent.map((d) => `${d.job_id}: ${epsilonText(d.epsilon_spent, d.epsilon_unit)}`).join("\n") },
            spent.length ? Object.entries(totals).map(([u, e]) => epsilonText(e, u)).join(" · ") : "—"),
          h("td", { class: "muted" }, details(site)));
      });
      body.replaceChildren(...[
        table(["Site", "State", "Last heartbeat", "Jobs accepted", "Jobs refused (reasons)", "ε spent", "Details"],
              rows, { id: "sites-table" }),
        h("p", { class: "muted" }, "ε spent: the sum over jobs of the ε each site reported with its latest update " +
          "in that job, per unit: per patient record (record-level DP-SGD) or per site (update-level DP, a " +
          "hospital's whole dataset); see each job's page."),
        quarantined.length ? quarantineTable(quarantined) : null].filter(Boolean));
    },
  };
}

function quarantineTable(rows) {
  // Stored rows the aggregator refused to load at start-up (their jobs failed with the reason).
  return h("section", { id: "quarantine" },
    h("h2", {}, `Quarantined stored rows (${rows.length})`),
    table(["When", "Table", "Job", "Row", "Reason"], rows.map((q) => h("tr", {},
      h("td", { title: iso(q.at) }, ago(q.at)), h("td", {}, q.table_name),
      h("td", {}, q.job_id ? jobLink(q.job_id) : "—"), h("td", {}, q.row_key), h("td", {}, q.reason)))));
}

export function jobsView(ctx) {
  const body = h("div");
  const yaml = h("textarea", { id: "job-yaml", spellcheck: "false",
                               placeholder: "name: ...\ndataset: {name: ...}\n...  (a job file, as for `fedsilo job submit`)" });
  const result = h("div", { class: "result", id: "submit-result" });
  const submit = h("button", { type: "submit", id: "submit-job", disabled: !ctx.admin, title: ctx.admin ? "" : needsAdmin },
    "Submit job");
  const form = h("form", { class: "card", onsubmit: async (event) => {
    event.preventDefault();
    result.className = "result";
    result.replaceChildren("Submitting…");
    try {
      const created = await api("/api/v1/jobs", { method: "POST", body: yaml.value, type: "application/yaml" });
      result.className = "result ok";
      result.replaceChildren("Submitted: ", jobLink(created.job_id), ` (${created.state})`);
      yaml.value = "";
      await ctx.refresh();
    } catch (err) {
      result.className = "result bad";
      const fields = (err.errors || []).map((e) => `\n  ${e.field}: ${e.message}`).join("");
      result.replaceChildren(explain(err) + (fields ? `\nBad fields:${fields}` : ""));
    }
  } }, h("label", { for: "job-yaml" }, h("strong", {}, "Submit a job (YAML)")), yaml,
    h("div", { class: "actions" }, submit), result);
  return {
    mount(root) {
      root.append(h("h1", {}, "Jobs"), body, h("h2", {}, "New job"), form);
    },
    async refresh() {
      const jobs = await api("/api/v1/jobs");
      const rows = [...jobs].reverse().map((j) => h("tr", { "data-job": j.job_id },
        h("td", {}, jobLink(j.job_id)),
        h("td", {}, j.name),
        h("td", {}, badge(j.state), j.paused ? [" ", badge("paused")] : null,
          j.reason ? h("div", { class: "muted" }, j.reason) : null),
        h("td", { class: "num" }, `${j.round} / ${j.rounds}`),
        h("td", { class: "num" }, quorumText(j.quorum, j.min_sites, (j.sites || []).length)),
        h("td", { title: iso(j.deadline) }, j.deadline ? ago(j.deadline) : "—"),
        h("td", { title: iso(j.created_at) }, ago(j.created_at))));
      body.replaceChildren(table(["Job", "Name", "State", "Round", "Quorum / min sites", "Round deadline", "Created"],
                                 rows, { id: "jobs-table" }));
    },
  };
}

function quorumText(quorum, minSites, nSites) {
  const q = typeof quorum === "number" ? `${Math.round(quorum * 100)}%` : "—";
  return `${q} · min ${minSites ?? "?"} of ${nSites || "?"}`;
}

function metricSeries(history, pick) {
  const sites = [...new Set(history.flatMap((r) => Object.keys(r.sites || {})))].sort();
  return sites.map((site) => ({
    name: site,
    points: history.filter((r) => r.sites && r.sites[site]).map((r) => [r.round, pick(r.sites[site])]),
  }));
}

export function jobView(ctx, jobId) {
  const facts = h("div", { class: "facts", id: "job-facts" });
  const charts = h("div", { class: "charts", id: "charts" });
  const tables = h("div");
  const status = h("div", { class: "result", id: "action-result" });
  let summary = null;
  let confirmUntil = 0;

  async function act(action) {
    status.className = "result";
    status.replaceChildren(`${action}…`);
    try {
      await api(`/api/v1/jobs/${encodeURIComponent(jobId)}/${action}`, { method: "POST", body: "" });
      status.className = "result ok";
      status.replaceChildren(`${action}: done`);
      await ctx.refresh();
    } catch (err) {
      status.className = "result bad";
      status.replaceChildren(explain(err));
    }
  }
  const button = (id, label, onclick, cls = "") => h("button", { type: "button", id, class: cls, onclick }, label);
  const pause = button("pause", "Pause", () => act("pause"), "secondary");
  const resume = button("resume", "Resume", () => act("resume"), "secondary");
  const cancel = button("cancel", "Cancel job", () => {
    // Two clicks: a cancelled job cannot be restarted.
    if (Date.now() < confirmUntil) {
      confirmUntil = 0;
      act("cancel");
    } else {
      confirmUntil = Date.now() + 5000;
      cancel.textContent = "Click again to cancel";
      setTimeout(() => { cancel.textContent = "Cancel job"; }, 5000);
    }
  }, "danger");

  function updateButtons() {
    const ended = !summary || ENDED.has(summary.state);
    for (const [btn, off] of [[pause, ended || summary.paused], [resume, ended || !summary.paused], [cancel, ended]]) {
      btn.disabled = !ctx.admin || off;
      btn.title = ctx.admin ? "" : needsAdmin;
    }
  }

  return {
    mount(root) {
      root.append(h("h1", {}, "Job ", h("code", {}, jobId)), facts, h("div", { class: "actions" }, pause, resume, cancel),
        status, h("h2", {}, "Metrics per round"), charts, tables);
      updateButtons();
    },
    async refresh() {
      summary = await api(`/api/v1/jobs/${encodeURIComponent(jobId)}`);
      const s = summary;
      const fact = (label, ...value) => h("div", {}, h("span", {}, label), ...value);
      facts.replaceChildren(...[
        fact("state", badge(s.state), s.paused ? [" ", badge("paused")] : null),
        fact("name", s.name),
        fact("round", h("strong", { id: "job-round" }, String(s.round)), ` / ${s.rounds}`),
        fact("quorum", quorumText(s.spec.quorum, s.min_sites, Object.keys(s.sites).length)),
        fact("round deadline", `${s.spec.round_deadline_s} s`),
        fact("aggregation", s.spec.aggregation),
        fact("requested by", s.requester || "—"),
        fact("created", h("span", { title: iso(s.created_at) }, ago(s.created_at))),
        s.reason ? fact("reason", s.reason) : null,
      ].filter(Boolean));
      updateButtons();

      const hist = s.history.filter((r) => r.global);
      charts.replaceChildren(
        h("div", { class: "chart", id: "chart-global-auc" }, lineChart({
          title: "Global validation AUC", yLabel: "AUC",
          series: [{ name: "global (sample-weighted)", points: hist.map((r) => [r.round, r.global.auc]) }] })),
        h("div", { class: "chart", id: "chart-global-loss" }, lineChart({
          title: "Global loss", yLabel: "BCE loss",
          series: [
            { name: "validation", points: hist.map((r) => [r.round, r.global.loss]) },
            { name: "training (sites' mean)", points: s.history.map((r) => [r.round, r.train_loss]) },
          ] })),
        h("div", { class: "chart", id: "chart-site-auc" }, lineChart({
          title: "Validation AUC per site", yLabel: "AUC", series: metricSeries(s.history, (m) => m.auc) })),
        h("div", { class: "chart", id: "chart-site-loss" }, lineChart({
          title: "Validation loss per site", yLabel: "BCE loss", series: metricSeries(s.history, (m) => m.loss) })));

      const sites = Object.entries(s.sites).map(([site, d]) => h("tr", { "data-site": site },
        h("td", {}, site), h("td", {}, badge(d.decision)),
        h("td", {}, d.reasons.length ? h("ul", { class: "reasons" }, d.reasons.map((r) => h("li", {}, r))) : "—"),
        h("td", { class: "num" }, Object.keys(d.epsilon_by_unit || {}).length
          ? Object.entries(d.epsilon_by_unit).map(([u, e]) => epsilonText(e, u)).join(" · ")
          : num(d.epsilon, 2))));
      const rejections = s.rejections.map((r) => h("tr", {},
        h("td", { title: iso(r.at) }, ago(r.at)), h("td", {}, r.site ?? "—"), h("td", { class: "num" }, r.round ?? "—"),
        h("td", {}, h("code", {}, r.reason)), h("td", {}, r.detail)));
      tables.replaceChildren(
        h("h2", {}, "Sites: accepted and refused"),
        table(["Site", "Decision", "Reasons", `ε spent (job's unit: ${UNIT_WORDS[s.privacy?.unit] ?? "per site"})`],
              sites, { id: "job-sites" }),
        h("h2", {}, "Rejected updates"),
        table(["When", "Site", "Round", "Reason", "Detail"], rejections, { id: "job-rejections" }));
    },
  };
}
