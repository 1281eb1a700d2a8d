"""The job's report as one self-contained HTML file: plots inlined as data URIs, no script, no external file,
so it opens anywhere (a hospital's air-gapped laptop included) and can be mailed as it is."""

from __future__ import annotations

import base64
import datetime
from html import escape
from typing import Any

from aggregator.plots import SITE_LINES, quantiles, site_series, worst_sites
from aggregator.privacy_units import UNIT_WORDS, unit_label

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#222;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem} td,th{border:1px solid #ddd;padding:.25rem .6rem}
th{background:#f4f4f4;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee} .muted{color:#777} .bad{color:#a00} .ok{color:#070}
"""


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return escape(str(v))


def _param(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else escape(str(v))


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(head: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td class=\"n\">{c}</td>" if i >= numeric_from else f"<td>{c}</td>"
                         for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render(summary: dict[str, Any], plots: dict[str, bytes]) -> str:
    """`plots` maps a caption to PNG bytes (global curves, per-site curves)."""
    spec = summary["spec"]
    state = summary["state"]
    cls = "ok" if state == "finished" else ("bad" if state in ("failed", "cancelled") else "muted")
    parts = [
        f"<h1>{escape(summary['name'])} <span class=\"muted\">({escape(summary['job_id'])})</span></h1>",
        f"<p>State <b class=\"{cls}\">{escape(state)}</b>"
        + (f": {escape(summary['reason'])}" if summary.get("reason") else "")
        + f" · round {summary['round']} of {summary['rounds']} · submitted by {escape(summary['requester'] or '—')}"
        f" · {_when(summary['created_at'])} – {_when(summary['updated_at'])}</p>",
    ]
    hp, privacy = spec["hyperparameters"], spec["privacy"]
    params = [
        ("model", spec["model"]["name"]), ("dataset", spec["dataset"]["name"]), ("purpose", spec["purpose"]),
        ("aggregation", spec["aggregation"]), ("rounds", spec["rounds"]), ("min sites", spec["min_sites"]),
        ("local epochs", hp["epochs"]), ("learning rate", hp["learning_rate"]), ("batch size", hp["batch_size"]),
        ("optimizer", hp["optimizer"]), ("weight decay", hp["weight_decay"]),
        ("DP unit", f"{privacy['unit']} ({UNIT_WORDS[privacy['unit']]})"),
        ("clip norm", privacy["clip_norm"]), ("noise multiplier", privacy["noise_multiplier"]),
        ("δ", privacy["delta"]),
    ]
    if privacy["unit"] == "record":  # DP-SGD: each site calibrates its own σ for a target
        params += [("target ε per patient", privacy.get("target_epsilon")),
                   ("record clip norm", privacy.get("record_clip_norm")),
                   ("record noise multiplier", privacy.get("record_noise_multiplier") or "per site, for the target")]
    parts.append("<h2>Parameters</h2>" + _table(["parameter", "value"], [[escape(k), _param(v)] for k, v in params]))
    parts.append("<h2>AUC and loss per round</h2>")
    parts.append("<p class=\"muted\">Round r is global model version r (0: the initial model), evaluated by each "
                 "site on its own validation split; the global value is the sample-weighted mean.</p>")
    parts += [f"<figure>{_img(png, caption)}<figcaption>{escape(caption)}</figcaption></figure>"
              for caption, png in plots.items()]
    parts.append(_rounds_table(summary))
    parts.append("<h2>Sites: decision and privacy loss ε</h2>")
    unit = summary.get("privacy", {}).get("unit", "site")
    other = "record" if unit == "site" else "site"
    site_rows = [
        [escape(s), escape(d["decision"]), _num(d["epsilon"], 2),
         _num((d.get("epsilon_by_unit") or {}).get(other), 2), escape("; ".join(d["reasons"])) or "—"]
        for s, d in sorted(summary["sites"].items())
    ]
    # The job's unit first; the other column is filled only where a site's policy also applied that unit.
    site_table = _table(["site", "decision", f"{unit_label(unit)} (δ={privacy['delta']:g})",
                         f"{unit_label(other)} (where a site also applied it)", "reasons"], site_rows, numeric_from=2)
    if len(site_rows) > SITE_LINES:
        counts = ", ".join(f"{n} {d}" for d, n in sorted(summary.get("decisions", {}).items()))
        parts.append(_worst_table(summary))
        parts.append(f"<details><summary>All {len(site_rows)} sites ({escape(counts)})</summary>{site_table}</details>")
    else:
        parts.append(site_table)
    refused = [r for r in site_rows if r[1] == "refused"]
    parts.append("<h2>Refusals</h2>")
    parts.append(_table(["site", "decision", unit_label(unit), unit_label(other), "reasons"], refused,
                        numeric_from=2) if refused
                 else "<p class=\"muted\">No site refused the job.</p>")
    parts.append("<h2>Rejected updates</h2>")
    rej = [
        [escape(str(r.get("site") or "—")), _num(r.get("round")), escape(r["reason"]), escape(r.get("detail") or ""),
         _when(r.get("at"))]
        for r in summary["rejections"]
    ]
    parts.append(_table(["site", "round", "reason", "detail", "at"], rej, numeric_from=5) if rej
                 else "<p class=\"muted\">No update was rejected.</p>")
    title = escape(f"{summary['name']} ({summary['job_id']}) · fedsilo report")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")


def _rounds_table(summary: dict[str, Any]) -> str:
    """Per round, the global metrics and each site's (a column pair per site), or with many sites the sites'
    AUC quantiles instead of a column per site."""
    sites = sorted({s for h in summary["history"] for s in h["sites"]})
    many = len(sites) > SITE_LINES
    head = ["round", "global AUC", "global loss", "train loss"]
    head += ["site AUC min", "25 %", "median", "75 %", "max"] if many else [
        f"{s} {m}" for s in sites for m in ("AUC", "loss")]
    auc_q = quantiles(site_series(summary, "auc")) if many else {}
    rows = []
    for h in summary["history"]:
        g = h["global"] or {}
        row = [str(h["round"]), _num(g.get("auc")), _num(g.get("loss")), _num(h["train_loss"])]
        if many:
            q = auc_q.get(h["round"])
            row += [_num(v) for v in q] if q else ["—"] * 5
        else:
            for s in sites:
                m = h["sites"].get(s) or {}
                row += [_num(m.get("auc")), _num(m.get("loss"))]
        rows.append(row)
    return _table(head, rows) if rows else "<p class=\"muted\">No round was evaluated.</p>"


def _worst_table(summary: dict[str, Any]) -> str:
    """The sites with the lowest validation AUC of the last evaluated model: where an operator looks first."""
    series = site_series(summary, "auc")
    worst = worst_sites(series, higher_is_worse=False, k=10)
    rows = [[escape(s), str(series[s][-1][0]), _num(series[s][-1][1]),
             _num(summary["sites"].get(s, {}).get("epsilon"), 2)] for s in worst]
    return ("<p>The sites with the lowest validation AUC at their last evaluation:</p>"
            + _table(["site", "round", "AUC", unit_label(summary.get("privacy", {}).get("unit", "site"))], rows))
