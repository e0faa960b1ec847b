"""report.html: results.json as one page a browser opens offline (figures inlined, no scripts, no network).

Token shading: red for a token that lowers the entropy (negative contribution to δH₁), blue for one that
raises it; the strength is |contribution| over the largest |contribution| of any token on the page.
Hovering a token shows its position, text, log q, entropy H_t and contribution.
"""

import base64
import html
import math
from pathlib import Path

from probe_lightning.estimators import resolved
from probe_lightning.results import ENTROPY_COEF_FOR_ZERO, resolution, token_selections

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { margin-top: 1.4em; }
.lead { color: #57606a; margin-top: 0; }
.warning { background: #fff3cd; border: 2px solid #d4a72c; border-radius: 6px; padding: 0.8em 1em;
           font-weight: 600; }
.notes li { margin: 0.2em 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pairs td.num { text-align: left; }
img { max-width: 100%; border: 1px solid #d0d7de; }
.response { border: 1px solid #d0d7de; border-radius: 6px; padding: 0.6em 0.8em; margin: 0.8em 0; }
.meta { font-size: 0.9em; color: #57606a; margin-bottom: 0.4em; }
.tokens { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.88em;
          white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 2px; cursor: help; white-space: pre-wrap; }
.tok:hover { outline: 1px solid #1f2328; }
.gap { color: #8c959f; }
.legend { display: inline-block; width: 220px; height: 0.9em; vertical-align: middle; border: 1px solid #d0d7de;
          background: linear-gradient(to right, rgb(220, 38, 38), #fff, rgb(37, 99, 235)); }
details pre { white-space: pre-wrap; background: #f6f8fa; padding: 0.5em; margin: 0.3em 0; }
"""

_NEGATIVE, _POSITIVE = (220, 38, 38), (37, 99, 235)  # red lowers the entropy, blue raises it
_SHOWN = {"\n": "⏎\n", "\t": "⇥", "\r": "␍"}  # whitespace drawn visibly, the newline still breaking the line
_ROLES = {"U": "U (update batch)", "E": "E (entropy batch)"}
_SWEEP_COLUMNS = {
    "eta": "η", "delta_h1": "δH₁(η)", "delta_h_true": "true ΔH", "delta_h_true_se": "SE", "ratio": "ratio",
    "ess": "ESS", "covariance_proxy": "covariance proxy",
}  # fmt: skip


def write_report(results: dict, folder: Path) -> Path:
    """Write folder/report.html from results.json's dict and the figures beside it; returns its path."""
    folder = Path(folder)
    probes = results.get("probes", [])
    scale = _largest_token_contribution(probes)
    sections = [_summary(results)] + [_probe_section(probe, folder, scale, len(probes) > 1) for probe in probes]
    title = html.escape(f"δH₁ probe report: {results.get('model') or 'model'}")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _summary(results: dict) -> str:
    """The run: δH₁ ± SE, the warning if δH₁ says nothing, settings, trainer settings and notes."""
    if "delta_h1" in results:
        headline = f"δH₁ = {_with_se(results['delta_h1'], results.get('delta_h1_se'))} nats"
    else:
        headline = "δH₁: no probe finished"
    parts = [f"<h1>{html.escape(headline)}</h1>"]
    target = results.get("entropy_target", "?")
    lead = f"the predicted change of the {target} entropy that the next training step causes"
    if results.get("num_probes", 0) > 1:
        lead += f"; the mean over {results['num_probes']} probes"
        if results.get("delta_h1_mean_se") is not None:
            lead += f" (their spread gives SE {_number(results['delta_h1_mean_se'])})"
    parts.append(f'<p class="lead">{html.escape(lead)}</p>')
    status = resolution(results, results.get("G"))
    if status:
        parts.append(f'<p class="{"lead" if results["resolved"] else "warning"}">{html.escape(status)}</p>')
    if results.get("empty"):
        parts.append(f'<div class="warning">Warning: {html.escape(results["empty"])}</div>')
    eta = _number(results.get("learning_rate"))
    if results.get("learning_rate_source"):
        eta += f" (from {results['learning_rate_source']})"
    update = str(results.get("update", "?"))
    if results.get("preconditioner"):
        update += f" (preconditioner: {results['preconditioner']})"
    settings = {
        "model": results.get("model"), "checkpoint": results.get("checkpoint"),
        "entropy target": results.get("entropy_target"), "estimator": results.get("estimator"),
        "update geometry": update, "learning rate η": eta, "probes": results.get("num_probes"),
        "mixed update fraction": results.get("mixed_update_fraction"), "clip factor": results.get("clip_factor"),
    }  # fmt: skip
    parts.append(_table(["setting", "value"], [[name, value] for name, value in settings.items()], "pairs"))
    if results.get("trainer"):
        parts.append("<h2>Trainer settings</h2>")
        rows = [[name, entry.get("value"), entry.get("source")] for name, entry in results["trainer"].items()]
        parts.append(_table(["setting", "value", "source"], rows, "pairs"))
    if results.get("notes"):
        items = "".join(f"<li>{html.escape(note)}</li>" for note in results["notes"])
        parts.append(f'<h2>Notes</h2>\n<ul class="notes">{items}</ul>')
    if results.get("num_probes", 0) > 1 and results.get("eta_sweep"):
        parts.append("<h2>η sweep, mean over the probes</h2>")
        parts.append(_sweep_tables(results["eta_sweep"], results.get("eta_sweep_summary")))
    return "\n".join(parts)


def _probe_section(probe: dict, folder: Path, scale: float, several: bool) -> str:
    """One probe: δH₁ ± SE (resolved or not, where several probes make it differ from the summary's), its η
    sweep, its counterfactual selections, its top responses and tokens."""
    k = probe["probe_index"]
    headline = f"Probe {k}: δH₁ = {_with_se(probe['delta_h1'], probe.get('delta_h1_se'))} nats"
    parts = [f'<section id="probe-{k}">', f"<h2>{html.escape(headline)}</h2>"]
    status = resolution(probe) if several else None
    if status:
        parts.append(f'<p class="lead">{html.escape(status)}</p>')
    sweep_png = folder / f"eta_sweep_probe{k}.png"
    if probe.get("eta_sweep") or sweep_png.exists():
        parts.append("<h3>η sweep: the true entropy change against the prediction</h3>")
        parts.append(_image(sweep_png, f"probe {k}: true ΔH against η"))
        if probe.get("eta_sweep"):
            parts.append(_sweep_tables(probe["eta_sweep"], probe.get("eta_sweep_summary")))
    if probe.get("next_checkpoint"):
        parts.append(_next_checkpoint_section(probe["next_checkpoint"]))
    blocks_png = folder / f"block_shares_probe{k}.png"
    if probe.get("block_shares"):
        parts.append("<h3>Where in the network δH₁ comes from: each block's share ⟨X̄, Δθ⟩</h3>")
        parts.append(_image(blocks_png, f"probe {k}: δH₁ per block"))
        errors = probe.get("block_shares_se") or {}
        rows = [[block, share, errors.get(block), share / probe["delta_h1"] if probe["delta_h1"] else None]
                for block, share in probe["block_shares"].items()]  # fmt: skip
        parts.append(_table(["block", "share of δH₁", "SE", "fraction of δH₁"], rows))
    counterfactual_png = folder / f"counterfactuals_probe{k}.png"
    if probe.get("counterfactuals") or counterfactual_png.exists():
        parts.append("<h3>Counterfactual token selections: δH₁ of a step trained only on them</h3>")
        parts.append(_image(counterfactual_png, f"probe {k}: δH₁ per token selection"))
        if probe.get("counterfactuals"):
            parts.append(_counterfactual_table(token_selections(probe["counterfactuals"])))
        if (probe.get("counterfactuals") or {}).get(ENTROPY_COEF_FOR_ZERO):
            parts.append(_entropy_coef_table(probe["counterfactuals"][ENTROPY_COEF_FOR_ZERO]))
    if probe.get("top_responses"):
        parts.append("<h3>Top responses by |contribution|</h3>")
        if not any("se" in row for row in probe["top_responses"] + (probe.get("top_tokens") or [])):
            parts.append("<p>Their standard errors: run with <code>--model.top_contributions_se true</code>.</p>")
        parts.append(_legend(probe.get("contributions_add_up_to"), scale))
        parts.extend(_response(response, scale) for response in probe["top_responses"])
    if probe.get("top_tokens"):
        parts.append("<h3>Top tokens by |contribution|</h3>")
        parts.append(_top_tokens_table(probe["top_tokens"], scale))
    parts.append("</section>")
    return "\n".join(parts)


def _next_checkpoint_section(nxt: dict) -> str:
    """The prediction beside the step the trainer really took (model.next_checkpoint)."""
    steps = f"{nxt['steps']} optimizer step{'s' if nxt['steps'] > 1 else ''}"
    parts = [f"<h3>Against the trainer's next checkpoint: {html.escape(str(nxt['path']))} ({steps} later)</h3>"]
    if nxt.get("note"):
        parts.append(f'<div class="warning">{html.escape(nxt["note"])}</div>')
    rows = [
        ["δH₁ (predicted step, first order)", nxt["delta_h1"], None],
        ["⟨X̄, Δθ_real⟩ (the real step, first order)", nxt["delta_h_along_real"], nxt["delta_h_along_real_se"]],
        ["true change H(θ′) − H(θ) (V batch)", nxt["delta_h_true"], nxt["delta_h_true_se"]],
        ["covariance proxy −η Cov(log π, A)", nxt["covariance_proxy"], None],
    ]
    parts.append(_table(["entropy change", "nats", "SE"], rows))
    agreement = [["cos(Δθ_pred, Δθ_real)", f"{nxt['cosine']:.6f}"], ["‖Δθ_pred‖ / ‖Δθ_real‖", nxt["norm_ratio"]],
                 ["ESS of the true change", nxt["ess"]]]  # fmt: skip
    parts.append(_table(["step agreement", "value"], agreement, "pairs"))
    if nxt.get("least_aligned"):
        rows = [[row["name"], row["cosine"], row["norm_ratio"]] for row in nxt["least_aligned"]]
        parts.append(_table(["least aligned tensors", "cos", "‖pred‖ / ‖real‖"], rows))
    return "\n".join(parts)


def _sweep_tables(rows: list[dict], summary: dict | None) -> str:
    columns = [key for key in _SWEEP_COLUMNS if key in rows[0]]
    table = _table([_SWEEP_COLUMNS[key] for key in columns], [[row[key] for key in columns] for row in rows])
    if summary:
        table += _table(
            ["summary", "value"], [[key.replace("_", " "), value] for key, value in summary.items()], "pairs"
        )
    return table


def _counterfactual_table(counterfactuals: dict) -> str:
    """Each selection's δH₁ with its SE and whether its sign is resolved, its share of the all-token δH₁, its tokens,
    and what the left-out tokens carry (with their SE)."""
    everything = counterfactuals.get("all", {}).get("delta_h1")
    rows = []
    for name, entry in counterfactuals.items():
        share = entry["delta_h1"] / everything if everything else None
        sign = resolved(entry["delta_h1"], entry.get("se"))
        rows.append([name, entry["delta_h1"], entry.get("se"), {True: "yes", False: "no"}.get(sign), share,
                     entry.get("tokens"), entry.get("fraction"), entry.get("removed_delta_h1"),
                     entry.get("removed_se")])  # fmt: skip
    header = ["selection", "δH₁", "SE", "resolved", "δH₁ / δH₁(all)", "tokens", "fraction of tokens",
              "δH₁ of the left-out tokens", "its SE"]  # fmt: skip
    return _table(header, rows)


def _entropy_coef_table(entry: dict) -> str:
    """The entropy_coef c* whose step leaves the entropy unchanged, beside δH₁ at the checkpoint's coefficient, at 0."""
    value = "none in entropy_coef ≥ 0" if not entry["exists"] else entry["value"]
    rows = [
        ["entropy_coef c* with δH₁(c*) = 0", value, entry["se"] if entry["exists"] else None],
        [f"δH₁ at the checkpoint's entropy_coef ({_number(entry['checkpoint_coef'])})",
         entry["delta_h1_at_checkpoint_coef"], None],
        ["δH₁ at entropy_coef 0", entry["delta_h1_at_zero_coef"], None],
        ["∂δH₁/∂entropy_coef at c*", entry.get("delta_h1_slope"), None],
    ]  # fmt: skip
    parts = [
        f"<h3>The entropy bonus that holds the entropy steady ({html.escape(entry['method'])})</h3>",
        _table(["", "value", "SE"], rows),
    ]
    if entry.get("note"):
        parts.append(f'<p class="meta">{html.escape(entry["note"])}</p>')
    return "\n".join(parts)


def _legend(adds_up_to: str | None, scale: float) -> str:
    text = (
        f"red lowers the entropy, blue raises it; full colour is |contribution| = {_number(scale)}, "
        "the largest on this page; hover a token for its numbers."
    )
    if adds_up_to:
        text += f" The contributions add up to {'δH₁' if adds_up_to == 'delta_h1' else adds_up_to}."
    roles = (
        "U: the update batch, which the step trains on. The entropy batch (E), on which the entropy is measured, "
        "has one share per prompt (the results' entropy_prompt_contributions): X has no token-level split."
    )
    return f'<p class="meta"><span class="legend"></span> {html.escape(text)}<br>{html.escape(roles)}</p>'


def _response(response: dict, scale: float) -> str:
    """One response: what it is and its numbers, the question folded away, its tokens shaded."""
    meta = (
        f"{_ROLES.get(response.get('role'), response.get('role'))} · prompt {response.get('prompt_id')} · "
        f"response {response.get('response')} · reward {_number(response.get('reward'))} · "
        f"advantage {_number(response.get('advantage'))} · {response.get('length')} tokens · "
        f"contribution {_number(response.get('contribution'))}"
        + (f" ± {_number(response['se'])} (SE)" if response.get("se") is not None else "")
    )
    parts = ['<div class="response">', f'<div class="meta">{html.escape(meta)}</div>']
    if response.get("question"):
        parts.append(f"<details><summary>question</summary><pre>{html.escape(response['question'])}</pre></details>")
    tokens = sorted(response.get("tokens") or [], key=lambda t: t["position"])
    if tokens:
        spans, previous = [], None
        for token in tokens:
            if previous is not None and token["position"] > previous + 1:
                spans.append('<span class="gap">…</span>')
            spans.append(_token_span(token, scale))
            previous = token["position"]
        parts.append(f'<div class="tokens">{"".join(spans)}</div>')
    elif response.get("response_text"):
        parts.append(f'<div class="tokens">{html.escape(response["response_text"])}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def _top_tokens_table(tokens: list[dict], scale: float) -> str:
    header = ["prompt", "response", "position", "token", "token id", "log q", "H_t", "advantage", "contribution", "SE"]
    rows = "".join(
        "<tr>"
        + "".join(_cell(t.get(key)) for key in ("prompt_id", "response", "position"))
        + f'<td class="tokens">{_token_span(t, scale)}</td>'
        + "".join(_cell(t.get(key)) for key in ("token_id", "log_q", "entropy", "advantage", "contribution", "se"))
        + "</tr>"
        for t in tokens
    )
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _token_span(token: dict, scale: float) -> str:
    """The token's text, shaded by its contribution, with its numbers in the hover tooltip. An E response's
    tokens have no contribution (X has no token-level split): they stay unshaded."""
    contribution = token.get("contribution")
    tooltip = (
        f"position {token.get('position')}\ntoken {token.get('token')!r} (id {token.get('token_id')})\n"
        f"log q = {_number(token.get('log_q'))}\nH_t = {_number(token.get('entropy'))}\n"
        f"contribution = {_number(contribution)}"
    )
    style = f' style="{_shade(contribution, scale)}"' if contribution is not None else ""
    return f'<span class="tok"{style} title="{html.escape(tooltip)}">{_visible(token.get("token", ""))}</span>'


def _shade(contribution: float, scale: float) -> str:
    strength = abs(contribution) / scale if scale > 0 and math.isfinite(contribution) else 0.0
    red, green, blue = _NEGATIVE if contribution < 0 else _POSITIVE
    alpha = 0.85 * strength
    text = "color: #fff; " if alpha > 0.5 else ""  # dark backgrounds need light text
    return f"{text}background: rgba({red}, {green}, {blue}, {alpha:.3f})"


def _visible(text: str) -> str:
    """Escaped token text with whitespace drawn, so a space or newline token is still something to hover."""
    if text == "":
        return "∅"
    if text.strip() == "":
        text = text.replace(" ", "·")
    return html.escape("".join(_SHOWN.get(char, char) for char in text))


def _largest_token_contribution(probes: list[dict]) -> float:
    """max |contribution| over every token the page shades: the response tokens and the top tokens."""
    values = []
    for probe in probes:
        tokens = [t for response in probe.get("top_responses") or [] for t in response.get("tokens") or []]
        values += [t.get("contribution") for t in tokens + (probe.get("top_tokens") or [])]
    return max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0.0)


def _image(path: Path, alt: str) -> str:
    """The PNG inlined as a data URI, or a line saying it is absent."""
    if not path.exists():
        return f'<p class="meta">({html.escape(path.name)} is absent)</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _table(header: list[str], rows: list[list], css_class: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in rows)
    opening = f'<table class="{css_class}">' if css_class else "<table>"
    return f"{opening}<tr>{head}</tr>{body}</table>"


def _cell(value) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{_number(value)}</td>' if numeric else f"<td>{html.escape(_number(value))}</td>"


def _with_se(value: float, se: float | None) -> str:
    return f"{_number(value)} ± {_number(se)}" if se is not None else f"{_number(value)} (SE not computed)"


def _number(value) -> str:
    """4 significant digits for floats, — for a missing value, anything else as str."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
