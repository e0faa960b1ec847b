"""report.html: one self-contained page (no network), every model output escaped, tokens shaded with tooltips."""

from html.parser import HTMLParser

import matplotlib.pyplot as plt
import pytest

from probe_lightning.plots import block_shares_figure, counterfactual_figure, eta_sweep_figure
from probe_lightning.report import write_report
from probe_lightning.results import NO_MIXED_OUTCOMES, no_mixed_outcomes

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """The page's tags (with attributes), its text, and whether every opened element was closed in order."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self.mismatched: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.mismatched.append(tag)

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]

    def token_spans(self) -> list[dict]:
        return [attrs for attrs in self.all("span") if attrs.get("class") == "tok"]


def token(position, text, log_q, entropy, contribution):
    return {"position": position, "token_id": 1000 + position, "token": text, "log_q": log_q, "entropy": entropy,
            "contribution": contribution}  # fmt: skip


SWEEP = [
    {"eta": eta, "delta_h1": -0.0123 * eta / 1e-6, "delta_h_true": -0.0119 * eta / 1e-6, "delta_h_true_se": 0.0004,
     "ess": 62.5, "ratio": 0.967, "ratio_se": 0.03, "covariance_proxy": -0.02 * eta / 1e-6}
    for eta in (1e-7, 1e-6, 1e-5)
]  # fmt: skip
COUNTERFACTUALS = {
    "all": {"delta_h1": -0.0123, "tokens": 4800, "fraction": 1.0, "removed_delta_h1": 0.0, "se": 0.004},
    "top_entropy_0.2": {"delta_h1": -0.0151, "tokens": 960, "fraction": 0.2, "removed_delta_h1": 0.0028, "se": 0.009},
    "top_entropy_0.5": {"delta_h1": -0.0137, "tokens": 2400, "fraction": 0.5, "removed_delta_h1": 0.0014, "se": 0.006},
    "clip_cov": {"delta_h1": -0.0119, "tokens": 4799, "fraction": 0.9998, "removed_delta_h1": -0.0004, "se": 0.004},
    "kl_cov": {"delta_h1": -0.0101, "tokens": 4799, "fraction": 0.9998, "removed_delta_h1": -0.0022, "se": None},
}
UPDATE_TOKENS = [
    token(0, "The", -0.105, 0.412, -0.0008),
    token(1, " answer", -1.386, 1.874, -0.0020),  # the page's largest |contribution|
    token(2, "<b>", -2.303, 2.512, 0.0010),  # model output that looks like markup
    token(3, "\n", -0.051, 0.203, 0.0001),
    token(4, " 42", -0.693, 0.955, -0.0005),
]
RESULTS = {
    "model": "Qwen/Qwen2.5-0.5B-Instruct", "checkpoint": "runs/grpo/checkpoint-200", "learning_rate": 1e-6,
    "learning_rate_source": "checkpoint", "update": "adam_precondition", "preconditioner": "adam",
    "entropy_target": "token_mean", "estimator": "rb", "num_probes": 1, "delta_h1": -0.0123, "delta_h1_se": 0.0021,
    "mixed_update_fraction": 0.75, "clip_factor": 1.0,
    "trainer": {"loss_type": {"value": "dapo", "source": "checkpoint"}, "beta": {"value": 0.0, "source": "default"}},
    "notes": ["G_E = 1: X uses no leave-one-out baseline (unbiased, higher variance)"],
    "probes": [{
        "probe_index": 0, "delta_h1": -0.0123, "delta_h1_se": 0.0021, "eta_sweep": SWEEP,
        "eta_sweep_summary": {"noise_floor": 1e-4, "linear_limit_eta": 1e-5, "slope": 0.99},
        "counterfactuals": COUNTERFACTUALS, "contributions_add_up_to": "delta_h1",
        "top_responses": [
            {"role": "U", "prompt_id": 7, "response": 2, "question": "What is 6 × 7? <script>alert(1)</script>",
             "response_text": "The answer<b>\n 42", "reward": 1.0, "advantage": 0.87, "length": 5,
             "contribution": -0.0022, "se": 0.0007, "tokens": UPDATE_TOKENS},
            {"role": "E", "prompt_id": 3, "response": 0, "question": "What is 2 + 2?", "response_text": " 4",
             "reward": 1.0, "advantage": 0.0, "length": 1, "contribution": 0.0004,
             "tokens": [token(0, " 4", -0.02, 0.09, None)]},
        ],
        "top_tokens": [{**t, "prompt_id": 7, "response": 2, "advantage": 0.87, "se": 0.0003} for t in UPDATE_TOKENS[:3]],
    }],
}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A run folder as the probe leaves it: the two figures of probe 0 beside results.json."""
    folder = tmp_path_factory.mktemp("run")
    for name, figure in (
        ("eta_sweep_probe0.png", eta_sweep_figure(SWEEP, "probe 0: true ΔH against predictions")),
        ("counterfactuals_probe0.png", counterfactual_figure(COUNTERFACTUALS, "probe 0: counterfactual selections")),
    ):
        figure.savefig(folder / name)
        plt.close(figure)
    return folder


@pytest.fixture(scope="module")
def html_text(folder) -> str:
    return write_report(RESULTS, folder).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def page(html_text) -> Page:
    return Page(html_text)


def test_report_is_written_as_report_html_in_the_folder(folder):
    assert write_report(RESULTS, folder) == folder / "report.html"


def test_every_opened_element_is_closed_in_order(page):
    assert page.mismatched == [] and page.open == []
    assert [name for name, _ in page.tags[:3]] == ["html", "head", "meta"]


def test_header_shows_delta_h1_with_its_standard_error(page):
    assert "δH₁ = -0.0123 ± 0.0021 nats" in "".join(page.text)


def test_both_figures_are_inlined_as_data_uris(page):
    sources = [img["src"] for img in page.all("img")]
    assert len(sources) == 2
    assert all(src.startswith("data:image/png;base64,") and len(src) > 10_000 for src in sources)


def test_page_loads_nothing_from_elsewhere(page, html_text):
    assert page.all("script") == [] and page.all("link") == []
    references = [value for _, attrs in page.tags for key, value in attrs.items() if key in ("src", "href")]
    assert references and all(value.startswith("data:") for value in references)
    style = html_text[html_text.index("<style>") : html_text.index("</style>")]
    assert "url(" not in style and "@import" not in style and "@font-face" not in style


def test_token_spans_carry_their_numbers_in_tooltips(page):
    answer = page.token_spans()[1]["title"]
    assert answer == "position 1\ntoken ' answer' (id 1001)\nlog q = -1.386\nH_t = 1.874\ncontribution = -0.002"


def test_token_that_looks_like_markup_is_shown_as_text(page, html_text):
    assert "b" not in {name for name, _ in page.tags} and "script" not in {name for name, _ in page.tags}
    assert "&lt;b&gt;" in html_text
    assert "<b>" in "".join(page.text)


def test_newline_token_is_drawn_visibly(page):
    assert "⏎\n" in "".join(page.text)


def test_shading_is_red_for_negative_and_blue_for_positive_in_proportion_to_the_largest(page):
    styles = [span.get("style") for span in page.token_spans()]
    assert styles[1] == "color: #fff; background: rgba(220, 38, 38, 0.850)"  # the largest |contribution|
    assert styles[2] == "background: rgba(37, 99, 235, 0.425)"  # half of it, positive
    assert styles[5] is None  # the E response's token has no token-level contribution


def test_empty_warning_is_shown_when_every_advantage_is_zero(tmp_path):
    page = Page(write_report({**RESULTS, "empty": NO_MIXED_OUTCOMES}, tmp_path).read_text(encoding="utf-8"))
    assert any(attrs.get("class") == "warning" for attrs in page.all("div"))
    assert f"Warning: {NO_MIXED_OUTCOMES}" in "".join(page.text)


def test_no_warning_without_empty(page):
    assert not any(attrs.get("class") == "warning" for attrs in page.all("div"))


def test_missing_figures_are_named_not_broken(tmp_path):
    page = Page(write_report(RESULTS, tmp_path).read_text(encoding="utf-8"))
    assert page.all("img") == []
    assert "(eta_sweep_probe0.png is absent)" in "".join(page.text)


def test_counterfactual_figure_labels_each_selection_with_its_fraction_of_tokens():
    figure = counterfactual_figure(COUNTERFACTUALS, "probe 0")
    axes = figure.axes[0]
    labels = [label.get_text() for label in axes.get_yticklabels()]
    widths = [bar.get_width() for bar in axes.patches]
    plt.close(figure)
    assert labels == [
        "all (100% of tokens)\n-0.0123 ± 0.004", "top_entropy_0.2 (20% of tokens)\n-0.0151 ± 0.009",
        "top_entropy_0.5 (50% of tokens)\n-0.0137 ± 0.006", "clip_cov (99.98% of tokens)\n-0.0119 ± 0.004",
        "kl_cov (99.98% of tokens)\n-0.0101",  # no SE
    ]  # fmt: skip
    assert widths == [-0.0123, -0.0151, -0.0137, -0.0119, -0.0101]
    assert axes.get_xlabel() == "δH₁ of a step on these tokens only (nats), bars ± 2 SE"


def test_the_bar_charts_draw_two_standard_errors_either_side_of_each_bar_that_has_one():
    figure = counterfactual_figure(COUNTERFACTUALS, "probe 0")
    bars = figure.axes[0].containers[-1]  # the bars (with their error bars: .errorbar)
    spans = [segment[:, 0] if len(segment) else () for segment in bars.errorbar.lines[2][0].get_segments()]
    plt.close(figure)
    half_widths = [(high - low) / 2 for low, high in spans[:4]]
    assert half_widths == pytest.approx([0.008, 0.018, 0.012, 0.008]) and len(spans[4]) == 0  # kl_cov: no bar
    shares = {"embeddings": 1e-6, "layer 0": -3e-6}
    figure = block_shares_figure(shares, "probe 0", {"embeddings": 2e-6, "layer 0": 1e-6})
    bars = figure.axes[0].containers[-1]  # the bars (with their error bars: .errorbar)
    spans = [segment[:, 0] for segment in bars.errorbar.lines[2][0].get_segments()]
    plt.close(figure)
    assert [(high - low) / 2 for low, high in spans] == pytest.approx([4e-6, 2e-6])
    figure = block_shares_figure(shares, "probe 0")  # no SE: plain bars
    assert figure.axes[0].containers[0].errorbar is None and "SE" not in figure.axes[0].get_xlabel()
    plt.close(figure)


def test_the_counterfactual_table_gives_each_selection_its_se_and_whether_it_is_resolved(tmp_path):
    text = "".join(report_with_entropy_coef(tmp_path, ENTROPY_COEF).text)
    assert "selectionδH₁SEresolvedδH₁ / δH₁(all)" in text
    assert "all-0.01230.004yes1" in text and "top_entropy_0.2-0.01510.009no" in text
    assert "kl_cov-0.0101——" in text  # no SE: nothing said about resolution


ENTROPY_COEF = {
    "value": 0.0877, "se": 0.031, "exists": True, "delta_h1_at_checkpoint_coef": -0.0123, "checkpoint_coef": 0.0,
    "delta_h1_at_zero_coef": -0.0123, "delta_h1_slope": 0.14, "method": "root search", "note": None,
}  # fmt: skip


def report_with_entropy_coef(tmp_path, entry: dict) -> Page:
    probe = {**RESULTS["probes"][0], "counterfactuals": {**COUNTERFACTUALS, "entropy_coef_for_zero": entry}}
    return Page(write_report({**RESULTS, "probes": [probe]}, tmp_path).read_text(encoding="utf-8"))


def test_top_responses_and_tokens_show_their_contributions_se(page, tmp_path):
    text = "".join(page.text)
    assert "contribution -0.0022 ± 0.0007 (SE)" in text and "contribution 0.0004" in text  # the E response: none
    assert "advantagecontributionSE" in text and "0.87-0.0020.0003" in text  # the top tokens' table
    assert "model.top_contributions_se" not in text
    probe = RESULTS["probes"][0]
    without = {**probe, "top_responses": [{k: v for k, v in r.items() if k != "se"} for r in probe["top_responses"]],
               "top_tokens": [{k: v for k, v in t.items() if k != "se"} for t in probe["top_tokens"]]}  # fmt: skip
    text = "".join(Page(write_report({**RESULTS, "probes": [without]}, tmp_path).read_text(encoding="utf-8")).text)
    assert "Their standard errors: run with --model.top_contributions_se true." in text


def test_the_entropy_coef_that_holds_the_entropy_is_tabled_beside_the_token_selections(tmp_path):
    text = "".join(report_with_entropy_coef(tmp_path, ENTROPY_COEF).text)
    selections = text.index("Counterfactual token selections")
    table = text.index("The entropy bonus that holds the entropy steady (root search)")
    assert selections < table < text.index("Top responses by |contribution|")
    assert "entropy_coef c* with δH₁(c*) = 00.08770.031" in text  # the row: name, value, SE
    assert "δH₁ at the checkpoint's entropy_coef (0)-0.0123" in text and "δH₁ at entropy_coef 0-0.0123" in text
    assert "entropy_coef_for_zero" not in text  # not a row of the token selections' table


def test_no_entropy_coef_in_range_is_said_with_its_reason(tmp_path):
    note = "the step already raises the entropy: only a negative entropy_coef (-0.04, an entropy penalty) would hold it"
    entry = {**ENTROPY_COEF, "value": -0.04, "exists": False, "method": "linear", "note": note}
    text = "".join(report_with_entropy_coef(tmp_path, entry).text)
    assert "entropy_coef c* with δH₁(c*) = 0none in entropy_coef ≥ 0—" in text and note in text


def test_no_mixed_outcomes_says_what_delta_h1_is_when_the_step_moves_anyway():
    """With every advantage 0 a plain step is 0; AdamW's momentum, an entropy bonus or a KL term still move θ."""
    plain = {"entropy_coef": {"value": 0.0}, "beta": {"value": 0.0}}
    assert no_mixed_outcomes("identity", plain) == NO_MIXED_OUTCOMES
    adam = no_mixed_outcomes("adamw_step", plain)
    assert "AdamW's momentum and weight decay" in adam and "δH₁ = 0" not in adam
    bonus = no_mixed_outcomes("identity", {"entropy_coef": {"value": 0.01}, "beta": {"value": 0.04}})
    assert "(the entropy bonus, the KL term)" in bonus
