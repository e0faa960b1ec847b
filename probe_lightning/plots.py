"""Figures next to results.json (matplotlib, no display needed)."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def eta_sweep_figure(rows: list[dict], title: str) -> plt.Figure:
    """The true ΔH ± SE against η, with the δH₁ line and the covariance proxy's; log axes where the signs allow."""
    rows = [r for r in rows if r["eta"] > 0]
    etas = [r["eta"] for r in rows]
    series = {
        "δH₁ (first order, this probe)": [r["delta_h1"] for r in rows],
        "covariance proxy −η Cov(log π, A)": [r["covariance_proxy"] for r in rows],
    }
    true_change = [r["delta_h_true"] for r in rows]
    errors = [r["delta_h_true_se"] for r in rows]
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    values = true_change + [v for line in series.values() for v in line]
    one_sign = all(v > 0 for v in values) or all(v < 0 for v in values)
    sign = -1.0 if one_sign and values and values[0] < 0 else 1.0
    measured = [sign * v for v in true_change]
    axes.errorbar(etas, measured, yerr=errors, fmt="o", capsize=3, label="true ΔH ± SE (V batch)")
    for (label, line), style in zip(series.items(), ("-", "--")):
        axes.plot(etas, [sign * v for v in line], style, label=label)
    axes.set_xscale("log")
    if one_sign:
        axes.set_yscale("log")
    else:
        axes.set_yscale("symlog", linthresh=min((abs(v) for v in values if v), default=1.0))
    axes.set_xlabel("learning rate η")
    axes.set_ylabel(("−" if sign < 0 else "") + "entropy change (nats)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    return figure


# The error bars of the bar charts span ± this many standard errors: a bar whose error bar crosses 0 is not resolved
# (estimators.RESOLVED_SES).
ERROR_BAR_SES = 2.0


def counterfactual_figure(counterfactuals: dict, title: str) -> plt.Figure:
    """δH₁ of a step trained only on each token selection, one horizontal bar per selection in the dict's order,
    with ± 2 SE error bars where the entries have their SE; each label gives the selection, its share of the tokens
    and the value (± SE), clear of the bars."""
    names = list(counterfactuals)
    values = [counterfactuals[name]["delta_h1"] for name in names]
    errors = [counterfactuals[name].get("se") for name in names]
    labels = [
        f"{name} ({_percent(counterfactuals[name]['fraction'])} of tokens)\n{v:.3g}"
        + (f" ± {se:.2g}" if _finite(se) else "")
        for name, v, se in zip(names, values, errors)
    ]
    figure, axes, _ = _signed_bars(labels, values, 0.6, errors=errors)
    return _finished(figure, axes, _with_bars("δH₁ of a step on these tokens only (nats)", errors), title)


def block_shares_figure(shares: dict[str, float], title: str, errors: dict[str, float] | None = None) -> plt.Figure:
    """Each block's share of δH₁ (its tensors' ⟨X̄_k, Δθ_k⟩ summed), one horizontal bar per block, network order;
    errors: each block's SE, drawn as ± 2 SE."""
    se = [(errors or {}).get(block) for block in shares]
    figure, axes, _ = _signed_bars(list(shares), list(shares.values()), 0.28, fontsize=8, errors=se)
    return _finished(figure, axes, _with_bars("share of δH₁: ⟨X̄, Δθ⟩ over the block's parameters (nats)", se), title)


def _signed_bars(labels: list[str], values: list[float], height_per_bar: float, fontsize=None, errors=None):
    """One horizontal bar per value, red below 0 and blue above, the first on top, with ± ERROR_BAR_SES · SE error
    bars where errors has a finite SE; (figure, axes, bars)."""
    figure, axes = plt.subplots(figsize=(6.4, 1.4 + height_per_bar * len(values)), dpi=100)
    xerr = None
    if errors is not None and any(_finite(se) for se in errors):
        xerr = [ERROR_BAR_SES * se if _finite(se) else float("nan") for se in errors]
    colors = ["tab:red" if v < 0 else "tab:blue" for v in values]
    bars = axes.barh(range(len(values)), values, color=colors, xerr=xerr, capsize=3, ecolor="dimgray")
    axes.set_yticks(range(len(values)), labels, fontsize=fontsize)
    axes.invert_yaxis()
    axes.axvline(0.0, color="black", linewidth=0.8)
    return figure, axes, bars


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _with_bars(label: str, errors: list) -> str:
    return label + (f", bars ± {ERROR_BAR_SES:g} SE" if any(_finite(se) for se in errors) else "")


def _finished(figure: plt.Figure, axes, xlabel: str, title: str) -> plt.Figure:
    """The x axis of a bar figure: few ticks, each its own number (3.0e-06, not a shared ×1e−5 that lands on
    the axis label, and long labels like −0.0125 must not overlap); label, title, grid."""
    axes.locator_params(axis="x", nbins=4)
    axes.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1e"))
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def _percent(fraction: float) -> str:
    """20% for 0.2, with as many decimals as it takes (up to 3) for a selection that is neither none nor all
    of the tokens to read as neither 0% nor 100%: Clip-Cov keeps 99.98%."""
    for digits in range(4):
        text = f"{fraction:.{digits}%}"
        if fraction in (0.0, 1.0) or float(text[:-1]) not in (0.0, 100.0):
            break
    return text
