"""`html`: one self-contained page per run, rendered from the JSON report alone (`render_html(doc)`).

The page is readable offline: inline CSS, figures as PNG data URIs (rgap_audit.figures, matplotlib), no
script at all, and a Content-Security-Policy that forbids loading anything (`default-src 'none'`,
images from `data:` only). What it shows, in order: the run (models, verdicts, exit status, errors),
then per model the verdict with what it rests on and its caveats, the rank chart beside `--verify`'s
per-layer errors, the reconstruction pictures, the identifiability spectrum, any further section of
the model (`SECTIONS`: the defences curves hook here), the layer table (the columns of `--format
table`), and the findings with their rule's text and source location.

Because it reads the JSON document and nothing else, an archived report re-renders with
`rgap-audit render report.json -o report.html`. Keys it does not know (a newer schema, rows of a new
kind) are shown generically rather than dropped.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from rgap_audit import figures
from rgap_audit.formats.jsonreport import report_schema

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
TABLE_HEADERS = ["#", "node", "op", "input", "unknowns", "grad rows", "fwd rows", "rank K", "rank [K;F]", "deficit", "verdict"]
VERIFY_HEADERS = ["measured nullity", "rel. error (plain)", "rel. error (projected)"]
EXIT_MEANING = {
    0: "no unsuppressed finding at or above --fail-on",
    1: "unsuppressed findings at or above --fail-on",
    2: "errors: some file or model could not be audited, or a step failed",
}
RECOVERABLE = {True: "yes", False: "no", None: "undecided"}

CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#d0d4d9; --bg:#ffffff; --alt:#f5f7fa; --bad:#b2182b; --warn:#b35806;
        --ok:#1b7837; --info:#2166ac; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 1.2rem 2rem 3rem; max-width: 1400px; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; } h2 { font-size: 1.3rem; margin: 2rem 0 .5rem; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05rem; margin: 1.3rem 0 .4rem; }
.muted { color: var(--muted); } code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .9em; }
table { border-collapse: collapse; margin: .4rem 0 1rem; font-size: .88rem; }
th, td { border: 1px solid var(--line); padding: .25rem .5rem; text-align: left; vertical-align: top; }
thead th { background: #e8ecf1; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: var(--alt); }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.deficient td { background: #fde0dc; } tr.not-understood td { background: #ece2f0; }
.badge { display: inline-block; padding: .05rem .5rem; border-radius: .8rem; font-size: .85rem; font-weight: 600;
         color: #fff; background: var(--muted); }
.badge.true { background: var(--bad); } .badge.false { background: var(--ok); } .badge.none { background: var(--warn); }
.sev-error { color: var(--bad); font-weight: 600; } .sev-warning { color: var(--warn); font-weight: 600; }
.sev-info { color: var(--info); }
.verdict-box { border-left: 5px solid var(--muted); background: var(--alt); padding: .5rem .9rem; margin: .5rem 0 1rem; }
.verdict-box.true { border-color: var(--bad); } .verdict-box.false { border-color: var(--ok); } .verdict-box.none { border-color: var(--warn); }
.errors { border-left: 5px solid var(--bad); background: #fdecea; padding: .5rem .9rem; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.charts figure { flex: 1 1 560px; max-width: 680px; } .charts figure.wide { flex-basis: 100%; max-width: 100%; }
figure { margin: .6rem 0 1.2rem; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .85rem; }
details > summary { cursor: pointer; color: var(--info); }
dl.generic { display: grid; grid-template-columns: max-content auto; gap: .1rem 1rem; margin: .3rem 0; }
dl.generic dt { font-weight: 600; } dl.generic dd { margin: 0; }
nav ul { padding-left: 1.2rem; }
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def num(value: Any) -> str:
    """Numbers as a table shows them: integers whole, floats to 3 significant digits, None as blank."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def err(value: Any) -> str:
    return "" if value is None else f"{value:.2g}"


def shape_text(shape: Any) -> str:
    return "x".join(str(d) for d in shape) if shape else "-"


def anchor(i: int) -> str:
    return f"model-{i}"


@lru_cache(maxsize=1)
def _known_keys() -> dict[str, frozenset[str]]:
    """The keys the shipped schema defines per record: anything else in a document is shown generically."""
    defs = report_schema()["$defs"]
    return {k: frozenset(defs[k]["properties"]) for k in ("layer", "model", "verification", "identifiability")}


@lru_cache(maxsize=1)
def _rules() -> dict[str, Any]:
    """The rule catalogue of this install, by code (for the text of each finding's rule)."""
    try:
        from rgap_audit.rules import load_rules

        return {r.code: r for r in load_rules()}
    except Exception:  # a broken catalogue must not stop the report: the findings still carry their message
        return {}


def figure(png: bytes | None, alt: str, caption: str) -> str:
    if png is None:
        return ""
    width = int.from_bytes(png[16:20], "big")  # the PNG's IHDR: a wide chart (many layers) gets a row of its own
    cls = ' class="wide"' if width > 800 else ""
    return (
        f'<figure{cls}><img src="{figures.data_uri(png)}" alt="{esc(alt)}" width="{width}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


# ----------------------------------------------------------------------------- generic rendering
def generic(value: Any, depth: int = 0) -> str:
    """Any JSON value, readably: dicts as definition lists, lists of dicts as tables, long lists cut."""
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">(empty)</span>'
        items = "".join(f"<dt>{esc(k)}</dt><dd>{generic(v, depth + 1)}</dd>" for k, v in value.items())
        return f'<dl class="generic">{items}</dl>'
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            keys = list(dict.fromkeys(k for v in value for k in v))
            head = "".join(f"<th>{esc(k)}</th>" for k in keys)
            body = "".join(
                "<tr>" + "".join(f"<td>{_cell(v.get(k), depth)}</td>" for k in keys) + "</tr>" for v in value
            )
            return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        shown = ", ".join(esc(num(v)) for v in value[:20])
        return shown + (f" … ({len(value)} in all)" if len(value) > 20 else "") if value else '<span class="muted">(none)</span>'
    return esc(num(value))


def _cell(value: Any, depth: int) -> str:
    if isinstance(value, (dict, list)) and depth < 3:
        return generic(value, depth + 1)
    return esc(num(value))


# ----------------------------------------------------------------------------- the run
def run_section(doc: dict[str, Any]) -> str:
    models = doc.get("models") or []
    summary = doc.get("summary") or {}
    findings = doc.get("findings") or []
    counts: dict[tuple[str, str], Counter[str]] = {}
    for f in findings:
        if not f.get("suppressed"):
            counts.setdefault((f.get("file"), f.get("model")), Counter())[f.get("severity", "")] += 1
    rows = []
    for i, m in enumerate(models):
        v = m.get("verdict") or {}
        c = counts.get((m.get("file"), m.get("model")), Counter())
        ver = m.get("verification") or {}
        measured = "" if not ver else ("confirmed" if ver.get("confirmed") is True else "not confirmed" if ver.get("confirmed") is False else "neither")
        loc = m.get("location") or {}
        rows.append(
            "<tr>"
            f'<td><a href="#{anchor(i)}">{esc(m.get("model"))}</a></td>'
            f'<td class="mono">{esc(m.get("file"))}{":" + esc(loc.get("line")) if loc.get("line") else ""}</td>'
            f"<td>{verdict_badge(v)}</td>"
            f"<td>{esc(RECOVERABLE.get(v.get('input_recoverable')))}</td>"
            f"<td>{esc(v.get('basis'))}</td>"
            f'<td class="num">{esc(num(v.get("input_deficit")) or "?")}</td>'
            f'<td class="num"><span class="sev-error">{c["error"]}</span> / <span class="sev-warning">{c["warning"]}</span> / '
            f'<span class="sev-info">{c["info"]}</span></td>'
            f"<td>{esc(measured)}</td>"
            "</tr>"
        )
    table = (
        "<table id=\"summary-table\"><thead><tr><th>model</th><th>file</th><th>verdict</th><th>input recoverable</th>"
        "<th>rests on</th><th>input directions undetermined</th><th>findings error / warning / info</th><th>--verify</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        if rows else '<p class="muted">No model was audited.</p>'
    )
    code = summary.get("exit_code")
    status = (
        f"exit status <strong>{esc(code)}</strong>: {esc(EXIT_MEANING.get(code, ''))}"
        if code is not None else '<span class="muted">exit status not recorded in this report</span>'
    )
    sev = summary.get("by_severity") or {}
    line = (
        f"{esc(summary.get('models', len(models)))} model(s); {esc(summary.get('findings', 0))} finding(s) "
        f"({esc(sev.get('error', 0))} error, {esc(sev.get('warning', 0))} warning, {esc(sev.get('info', 0))} info), "
        f"{esc(summary.get('suppressed', 0))} suppressed; input recoverable in {esc(summary.get('input_recoverable', 0))}, "
        f"undecided in {esc(summary.get('undecided', 0))}."
    )
    return f'<section id="summary"><h2>Run</h2><p>{status}</p><p>{line}</p>{table}{errors_section(doc)}</section>'


def errors_section(doc: dict[str, Any]) -> str:
    """The run's errors (the `errors` array, when the document has one)."""
    errors = doc.get("errors")
    if not errors:
        return ""
    items = []
    for e in errors:
        if not isinstance(e, dict):
            items.append(f"<li>{esc(e)}</li>")
            continue
        where = esc(e.get("file") or "<input>") + (f":{esc(e.get('line'))}" if e.get("line") else "")
        who = f" {esc(e.get('model'))}:" if e.get("model") else ""
        stage = f" [{esc(e.get('stage'))}]" if e.get("stage") else ""
        message = e.get("message") or e.get("cause") or ""
        rest = {k: v for k, v in e.items() if k not in ("file", "line", "model", "stage", "message", "cause")}
        items.append(f'<li><span class="mono">{where}:</span>{who}{stage} {esc(message)}{generic(rest) if rest else ""}</li>')
    return f'<div class="errors" id="errors"><h3>Errors ({len(errors)})</h3><ul>{"".join(items)}</ul></div>'


def verdict_badge(v: dict[str, Any]) -> str:
    rec = v.get("input_recoverable")
    cls = {True: "true", False: "false", None: "none"}.get(rec, "none")
    return f'<span class="badge {cls}">{esc(v.get("status"))}</span>'


# ----------------------------------------------------------------------------- one model
def layer_table(model: dict[str, Any]) -> str:
    """The walk, output first, with the columns of --format table (and --verify's measured columns)."""
    layers = model.get("layers") or []
    if not layers:
        return '<p class="muted">(no operations recorded)</p>'
    ver = model.get("verification") or {}
    measured = {m.get("node"): m for m in ver.get("layers") or []} if ver and not ver.get("batch_size") else {}
    known = _known_keys()["layer"]
    paths = Counter(r.get("module_path") for r in layers if r.get("module_path"))
    headers = TABLE_HEADERS + (VERIFY_HEADERS if measured else []) + ["details"]
    out = []
    for r in layers:
        name = r.get("module_path") or r.get("node") or ""
        if r.get("module_path") and paths[r["module_path"]] > 1:
            name += f" [{r.get('node')}]"
        rank_k = r.get("rank_grad") if r.get("rank_grad") is not None else r.get("rank_grad_counting")
        if r.get("rank") is not None:
            rank = num(r["rank"])
        elif r.get("rank_lower") is not None or r.get("rank_upper") is not None:
            rank = f"{num(r.get('rank_lower')) or '?'}..{num(r.get('rank_upper')) or '?'}"
        else:
            rank = ""
        verdict = esc(r.get("verdict"))
        if r.get("reason"):
            verdict += f': <span class="muted">{esc(r["reason"])}</span>'
        cells = [
            f'<td class="num">{esc(r.get("index"))}</td>', f'<td class="mono">{esc(name)}</td>', f"<td>{esc(r.get('op'))}</td>",
            f'<td class="mono">{esc(shape_text(r.get("input_shape")))}</td>',
            *(f'<td class="num">{esc(num(v))}</td>' for v in (r.get("unknowns"), r.get("grad_rows"), r.get("fwd_rows"), rank_k)),
            f'<td class="num">{esc(rank)}</td>', f'<td class="num">{esc(num(r.get("deficit")))}</td>', f"<td>{verdict}</td>",
        ]
        if measured:
            m = measured.get(r.get("node")) or {}
            cells += [
                f'<td class="num">{esc(num(m.get("measured_nullity")))}</td>',
                f'<td class="num">{esc(err(m.get("rel_error")))}</td>',
                f'<td class="num">{esc(err(m.get("rel_error_projected")))}</td>',
            ]
        details = {k: v for k, v in r.items() if v not in (None, [], {}, False, "") and k in _DETAIL_KEYS}
        details.update({k: v for k, v in r.items() if k not in known})  # a row kind or field this version does not know
        cells.append(f"<td>{'<details><summary>more</summary>' + generic(details) + '</details>' if details else ''}</td>")
        cls = "deficient" if (r.get("deficit") or 0) > 0 else ("not-understood" if r.get("verdict") == "not-understood" else "")
        out.append(f'<tr class="{cls}" data-kind="{esc(r.get("kind"))}">' + "".join(cells) + "</tr>")
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f'<table class="layers"><thead><tr>{head}</tr></thead><tbody>{"".join(out)}</tbody></table>'


_DETAIL_KEYS = (
    "kind", "rank_method", "sigma_min_rel", "chain", "chain_reason", "basis", "location", "seconds", "samples", "known_inputs",
    "frozen", "k_derivable", "undetermined", "probe", "param_rows", "span", "tokens",
)


def verdict_section(model: dict[str, Any]) -> str:
    v = model.get("verdict") or {}
    cls = {True: "true", False: "false", None: "none"}.get(v.get("input_recoverable"), "none")
    caveats = "".join(f"<li>{esc(c)}</li>" for c in v.get("caveats") or [])
    warnings = "".join(f"<li>{esc(w)}</li>" for w in model.get("warnings") or [])
    tolerances = model.get("tolerances") or {}
    return (
        f'<div class="verdict-box {cls}"><p>{verdict_badge(v)} input recoverable in closed form: '
        f"<strong>{esc(RECOVERABLE.get(v.get('input_recoverable')))}</strong>. {esc(v.get('summary'))}</p>"
        f"<p>Rests on: <strong>{esc(v.get('basis'))}</strong>; deficient layers: {esc(v.get('deficient_layers'))} "
        f"(total deficit {esc(v.get('total_deficit'))}); input directions undetermined: {esc(num(v.get('input_deficit')) or '?')}.</p>"
        + (f"<p>Caveats:</p><ul>{caveats}</ul>" if caveats else "")
        + (f"<p>Warnings:</p><ul>{warnings}</ul>" if warnings else "")
        + (f"<details><summary>numerical tolerances</summary>{generic(tolerances)}</details>" if tolerances else "")
        + "</div>"
    )


def verification_section(model: dict[str, Any]) -> str:
    ver = model.get("verification")
    if not ver:
        return ""
    name = model.get("model", "")
    keys = (
        "attempted", "confirmed", "variant", "rel_error", "mse", "psnr_db", "seconds", "tolerance", "input", "weights", "loss",
        "label", "label_recovered", "label_status", "ambiguous_inputs", "scaling", "settled", "batch_size", "attack", "outcome",
        "reason", "nearest_sample", "image",
    )
    facts = {k: ver[k] for k in keys if ver.get(k) is not None}
    line = []
    if ver.get("rel_error") is not None:
        line.append(f"relative error <strong>{esc(err(ver['rel_error']))}</strong>" + (f" ({esc(ver['variant'])})" if ver.get("variant") else ""))
    if ver.get("psnr_db") is not None:
        line.append(f"PSNR <strong>{ver['psnr_db']:.1f} dB</strong>")
    if ver.get("seconds") is not None:
        line.append(f"{ver['seconds']:.2f} s")
    if ver.get("input"):
        line.append(f"input: {esc(ver['input'])}")
    if ver.get("weights"):
        line.append(f"weights: {esc(ver['weights'])}")
    parts = [
        f'<section class="verification"><h3>--verify: the closed-form attack, measured</h3><p>{esc(ver.get("summary"))}</p>',
        f"<p>{' · '.join(line)}</p>" if line else "",
        f"<details><summary>all measurements</summary>{generic(facts)}</details>",
    ]
    panels = ver.get("panels") or []
    if panels:
        png = figures.reconstruction_png(panels, f"{name}: reconstruction")
        parts.append(figure(png, f"{name}: original, reconstruction, rescaled, difference",
                            "Per row: the original, the reconstruction on the original's value range, the reconstruction "
                            "rescaled to its own range, and the absolute difference (largest over channels)."))
    if ver.get("per_sample"):
        parts.append("<h4>per sample</h4>" + generic(ver["per_sample"]))
    for key in ("combination", "span_leak"):
        if ver.get(key):
            parts.append(f"<h4>{esc(key.replace('_', ' '))}</h4>" + generic(ver[key]))
    if ver.get("span_leak_reason"):
        parts.append(f"<p>span leak not measured: {esc(ver['span_leak_reason'])}</p>")
    if ver.get("warnings"):
        parts.append("<p>Warnings:</p><ul>" + "".join(f"<li>{esc(w)}</li>" for w in ver["warnings"]) + "</ul>")
    extra = {k: v for k, v in ver.items() if k not in _known_keys()["verification"]}
    if extra:
        parts.append("<h4>further measurements</h4>" + generic(extra))
    parts.append("</section>")
    return "".join(parts)


def identifiability_section(model: dict[str, Any]) -> str:
    ident = model.get("identifiability")
    if not ident:
        return ""
    name = model.get("model", "")
    facts = {k: ident.get(k) for k in ("unknowns", "gradient_entries", "rank", "deficit", "locally_unique", "sigma_min_rel", "rank_tol", "method", "seconds")}
    return (
        f'<section class="identifiability"><h3>Whole-network identifiability</h3><p>{esc(ident.get("summary"))}</p>{generic(facts)}'
        + figure(figures.spectrum_png(ident, name), f"{name}: singular spectrum",
                 "Singular values of d(gradient)/d(input) relative to the largest; the dashed line is the rank threshold.")
        + "</section>"
    )


def defences_section(model: dict[str, Any]) -> str:
    """--defences (a `defences` key of the model): each part's summary, the error against sigma with its prediction,
    the reconstructions at three noise levels, then every measurement (generically, so newer keys still show)."""
    value = model.get("defences")
    if value is None:
        return ""
    name = model.get("model", "")
    parts = [f'<section class="defences" id="defences-{esc(name)}"><h3>Defences: what stops the closed-form attack (measured)</h3>']
    if isinstance(value, dict):
        items = [(k, value.get(k)) for k in ("noise", "compression", "batch", "architecture")]
        lines = [f"<li><strong>{esc(k)}</strong>: {esc(v.get('summary'))}</li>" for k, v in items if isinstance(v, dict) and v.get("summary")]
        if lines:
            parts.append(f"<ul>{''.join(lines)}</ul>")
        noise = value.get("noise")
        if isinstance(noise, dict):
            parts.append(figure(figures.noise_png(noise, name), f"{name}: relative error against the noise multiplier",
                                "The attack's relative error at each noise multiplier sigma (median and range over noise draws), "
                                "the first-order prediction from per-layer probes, the worst case from the attack's gains, and the threshold."))
            if noise.get("panels"):
                parts.append(figure(figures.reconstruction_png(noise["panels"], f"{name}: R-GAP at three noise levels"),
                                    f"{name}: reconstructions at three noise levels",
                                    "Per row one noise multiplier: original, reconstruction, rescaled reconstruction, difference."))
        shown = {k: (({kk: vv for kk, vv in v.items() if kk != "panels"}) if isinstance(v, dict) else v) for k, v in value.items()}
        parts.append(f"<details><summary>all measurements</summary>{generic(shown)}</details>")
    else:
        parts.append(generic(value))
    parts.append("</section>")
    return "".join(parts)


# Model-level sections after the layer table, in page order: (JSON key, renderer). A new kind of result adds
# one entry here; keys without an entry are shown under "further data".
SECTIONS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("verification", verification_section),
    ("identifiability", identifiability_section),
    ("defences", defences_section),
]
_LAID_OUT = {"file", "model", "input_shape", "batch_size", "loss", "seed", "dtype", "layers", "verdict", "location", "warnings",
             "timings", "tolerances", *(k for k, _ in SECTIONS)}


def findings_table(findings: list[dict[str, Any]]) -> str:
    if not findings:
        return '<p class="muted">No findings.</p>'
    rules = _rules()
    rows = []
    for f in findings:
        rule = rules.get(str(f.get("code")))
        text = ""
        if rule is not None:
            text = (
                f"<details><summary>{esc(rule.summary)}</summary><p><strong>Why it matters.</strong> {esc(rule.why)}</p>"
                f"<p><strong>How to fix it.</strong> {esc(rule.fix)}</p>"
                f"<p class=\"muted\">Suppress on the reported line with <code># rgap: ignore[{esc(rule.code)}]</code>.</p></details>"
            )
        sev = f.get("severity", "")
        rows.append(
            f'<tr class="finding{" suppressed" if f.get("suppressed") else ""}">'
            f'<td class="sev-{esc(sev)}">{esc(sev)}{" (suppressed)" if f.get("suppressed") else ""}</td>'
            f'<td class="mono">{esc(f.get("code"))}<br>{esc(f.get("name"))}</td>'
            f'<td class="mono">{esc(f.get("file"))}:{esc(f.get("line"))}:{esc(f.get("col"))}</td>'
            f'<td class="mono">{esc(f.get("node") or "")}</td>'
            f"<td>{esc(f.get('message'))}{text}</td></tr>"
        )
    return (
        '<table class="findings"><thead><tr><th>severity</th><th>rule</th><th>location</th><th>node</th><th>message and rule</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def model_section(i: int, model: dict[str, Any], findings: list[dict[str, Any]]) -> str:
    name = model.get("model", "")
    loc = model.get("location") or {}
    where = esc(model.get("file")) + (f":{esc(loc.get('line'))}" if loc.get("line") else "")
    timings = model.get("timings") or {}
    total = timings.get("total_s", timings.get("total"))
    meta = (
        f'<p class="muted"><span class="mono">{where}</span> · input {esc(shape_text(model.get("input_shape")))} per sample · '
        f"batch {esc(model.get('batch_size'))} · loss {esc(model.get('loss'))} · seed {esc(model.get('seed'))} · {esc(model.get('dtype'))}"
        + (f" · audited in {total:.2f} s" if isinstance(total, (int, float)) else "")
        + "</p>"
    )
    parts = [f'<section class="model" id="{anchor(i)}"><h2>{esc(name)} {verdict_badge(model.get("verdict") or {})}</h2>', meta,
             verdict_section(model)]
    charts = [
        figure(figures.rank_png(model), f"{name}: rank against unknowns per layer",
               "Per weighted layer: unknowns (grey), rank of [K; F] (blue), the deficit (red) and rank K from the gradient alone (black tick)."),
        figure(figures.error_png(model), f"{name}: relative error per layer",
               "--verify: the attack's relative error at each weighted layer's input (log axis), labelled with the static verdict."),
    ]
    parts.append(f'<div class="charts">{"".join(charts)}</div>')
    for _, render in SECTIONS:
        parts.append(render(model))
    extra = {k: v for k, v in model.items() if k not in _LAID_OUT}
    if extra:
        parts.append("<h3>Further data</h3>" + generic(extra))
    parts.append("<h3>The walk, output first</h3>" + layer_table(model))
    mine = [f for f in findings if f.get("file") == model.get("file") and f.get("model") == name]
    parts.append(f"<h3>Findings ({len(mine)})</h3>" + findings_table(mine))
    parts.append("</section>")
    return "".join(parts)


def render_html(doc: dict[str, Any]) -> str:
    """The page for one JSON report (the dict `--format json` writes)."""
    models = doc.get("models") or []
    findings = doc.get("findings") or []
    tool = doc.get("tool") or {}
    known = {(m.get("file"), m.get("model")) for m in models}
    orphans = [f for f in findings if (f.get("file"), f.get("model")) not in known]
    nav = "".join(f'<li><a href="#{anchor(i)}">{esc(m.get("model"))}</a></li>' for i, m in enumerate(models))
    body = [
        f"<header><h1>rgap-audit report</h1><p class=\"muted\">{esc(tool.get('name', 'rgap-audit'))} {esc(tool.get('version', ''))}, "
        f"report schema {esc(doc.get('schema_version'))}. R-GAP rank analysis of how much of a client's input its shared gradient reveals.</p></header>",
        run_section(doc),
        f"<nav><ul>{nav}</ul></nav>" if nav else "",
        *(model_section(i, m, findings) for i, m in enumerate(models)),
    ]
    if orphans:
        body.append(f'<section id="other-findings"><h2>Findings of no audited model</h2>{findings_table(orphans)}</section>')
    extra = {k: v for k, v in doc.items() if k not in ("schema_version", "tool", "models", "findings", "summary", "errors")}
    if extra:
        body.append(f"<section><h2>Further data</h2>{generic(extra)}</section>")
    title = f"rgap-audit report: {', '.join(str(m.get('model')) for m in models) or 'no models'}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n"
    )
