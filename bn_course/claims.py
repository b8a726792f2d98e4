"""The claims ledger: every claim about batch norm that the course puts to the test.

Each claim names the notebook that tests it and carries a ``verdict``:

- ``"confirmed"`` -- the experiment shows it, for every seed we tried;
- ``"contested"`` -- true in part, or only under some settings, or the evidence is mixed;
- ``"refuted"``   -- the experiment shows the opposite, or the claimed mechanism is not what happens;
- ``None``        -- not tested yet: a claim added to the ledger before its experiment is written.

How a verdict gets here: the notebook that tests a claim runs its experiment,
decides the verdict from the numbers it just computed, and then calls
``assert_verdict(claim_id, observed)``. That assert fails if the ledger and the run
disagree, so the table shown in ``00_start_here`` and the README can never drift
from what the experiments show. To record a new verdict, edit ``verdict=`` below.
"""

from dataclasses import dataclass

VERDICTS = ("confirmed", "contested", "refuted")
KINDS = ("motivation", "benefit", "explanation", "limitation")


@dataclass(frozen=True)
class Claim:
    """One testable sentence about batch norm.

    id:        short snake_case name, unique, used by notebooks to look the claim up
    statement: the claim as the common explanations make it
    kind:      "motivation" (why normalize at all), "benefit", "explanation" (why it works)
               or "limitation"
    notebook:  file stem of the notebook that tests it, e.g. "05_training_with_batchnorm"
    section:   the heading, in that notebook, of the section that tests it (None until it is written)
    verdict:   "confirmed", "contested", "refuted", or None (not tested yet)
    """

    id: str
    statement: str
    kind: str
    notebook: str
    section: str | None = None
    verdict: str | None = None


CLAIMS = (
    # --- why normalize at all (01) --------------------------------------------------------
    Claim(
        id="depth_breaks_signal",
        statement="Without normalization, the activations and gradients of a deep network "
                  "shrink or grow layer after layer unless the initialization scale is just right.",
        kind="motivation",
        notebook="01_why_normalize",
        section="Gradients vanish or explode",
        verdict="confirmed",
    ),
    # --- the benefits the common explanations promise (05, 07) ----------------------------
    Claim(
        id="faster_training",
        statement="BN makes training faster: fewer steps to reach a given accuracy.",
        kind="benefit",
        notebook="05_training_with_batchnorm",
        section="1 · Figure 1 of the 2015 paper, at laptop scale",
        verdict="confirmed",
    ),
    Claim(
        id="stable_gradients",
        statement="BN makes training more stable: less risk of exploding or vanishing gradients "
                  "in deep networks.",
        kind="benefit",
        notebook="05_training_with_batchnorm",
        section="4 · Depth: activations and gradients at initialization",
        verdict="contested",
    ),
    Claim(
        id="higher_learning_rates",
        statement="BN allows higher learning rates: a wider range of learning rates trains well "
                  "without diverging.",
        kind="benefit",
        notebook="05_training_with_batchnorm",
        section="2 · Which learning rates train?",
        verdict="confirmed",
    ),
    Claim(
        id="less_init_sensitivity",
        statement="BN makes training less sensitive to the scale of the weight initialization.",
        kind="benefit",
        notebook="05_training_with_batchnorm",
        section="3 · How much does the initial scale of the weights matter?",
        verdict="confirmed",
    ),
    Claim(
        id="regularizes",
        statement="BN regularizes: it improves generalization (a smaller train/test gap).",
        kind="benefit",
        notebook="07_regularization_and_noise",
        section="1 · Does BN shrink the train/test gap?",
        verdict="contested",
    ),
    # --- why it works (05, 06) ---------------------------------------------------------------
    Claim(
        id="stable_input_distribution",
        statement="With BN, the distribution of a hidden layer's input stays put during training; "
                  "without BN it drifts (the 2015 paper's Figure 1).",
        kind="explanation",
        notebook="05_training_with_batchnorm",
        section="1 · Figure 1 of the 2015 paper, at laptop scale",
        verdict="confirmed",
    ),
    Claim(
        id="reduces_ics",
        statement="BN works by reducing internal covariate shift: the change of a layer's input "
                  "distribution caused by updates of the layers before it.",
        kind="explanation",
        notebook="06_why_does_it_work",
        section="1 · Internal covariate shift, measured",
        verdict="refuted",
    ),
    Claim(
        id="smoother_landscape",
        statement="BN makes the loss landscape smoother: the loss and its gradient change less "
                  "along the gradient direction.",
        kind="explanation",
        notebook="06_why_does_it_work",
        section="3 · The loss landscape along the gradient",
        verdict="contested",
    ),
    Claim(
        id="scale_invariance",
        statement="Weights that feed a BN layer are scale invariant; their norm grows during "
                  "training, so the effective learning rate (learning rate / squared weight norm) "
                  "shrinks unless weight decay holds it.",
        kind="explanation",
        notebook="06_why_does_it_work",
        section="4 · Scale invariance and the effective learning rate",
        verdict="confirmed",
    ),
    # --- limitations (07, 08, 09) ------------------------------------------------------------
    Claim(
        id="does_not_remove_overfitting",
        statement="BN does not remove overfitting on its own.",
        kind="limitation",
        notebook="07_regularization_and_noise",
        section="1 · Does BN shrink the train/test gap?",
        verdict="confirmed",
    ),
    Claim(
        id="dropout_before_bn_shift",
        statement="Dropout placed before BN shifts the variance between training and inference "
                  "and costs accuracy.",
        kind="limitation",
        notebook="07_regularization_and_noise",
        section="2 · Dropout and BN: the variance shift",
        verdict="contested",
    ),
    Claim(
        id="noisy_labels_memorized",
        statement="A network with BN still memorizes noisy labels; the validation curve (early "
                  "stopping) is what protects it.",
        kind="limitation",
        notebook="07_regularization_and_noise",
        section="3 · Noisy labels: BN still memorizes",
        verdict="confirmed",
    ),
    Claim(
        id="train_eval_mismatch",
        statement="BN behaves differently in training and evaluation: forgetting eval mode, or "
                  "running statistics that lag behind the weights, change the predictions.",
        kind="limitation",
        notebook="08_inference_and_pitfalls",
        section="Running statistics lag behind the weights",
        verdict="confirmed",
    ),
    Claim(
        id="non_iid_batches",
        statement="BN needs i.i.d. batches: batches that hold one class (or one domain) each "
                  "distort the statistics.",
        kind="limitation",
        notebook="08_inference_and_pitfalls",
        section="Non-i.i.d. batches",
        verdict="confirmed",
    ),
    Claim(
        id="small_batch_failure",
        statement="BN degrades with small batches (and cannot train with one value per channel); "
                  "GroupNorm and LayerNorm lose far less (their computation does not use the batch).",
        kind="limitation",
        notebook="09_beyond_batchnorm",
        section="Batch size: BN against LayerNorm and GroupNorm",
        verdict="confirmed",
    ),
)


def get_claim(claim_id, claims=CLAIMS):
    """The claim with this id; a clear KeyError listing the known ids otherwise."""
    for claim in claims:
        if claim.id == claim_id:
            return claim
    known = ", ".join(c.id for c in claims)
    raise KeyError(f"no claim with id {claim_id!r} in the ledger (bn_course/claims.py). Known ids: {known}.")


def assert_verdict(claim_id, observed, claims=CLAIMS):
    """Check that the verdict a notebook just reached is the one the ledger records.

    observed: "confirmed", "contested" or "refuted", decided from the run's own numbers.
    Raises AssertionError, naming both verdicts, if they disagree; returns the claim otherwise.
    """
    if observed not in VERDICTS:
        raise ValueError(f"observed verdict must be one of {VERDICTS}, got {observed!r}.")
    claim = get_claim(claim_id, claims)
    if claim.verdict != observed:
        raise AssertionError(
            f"claim {claim_id!r}: this run reached the verdict {observed!r}, but the ledger "
            f"(bn_course/claims.py) records {claim.verdict!r}. Either the experiment changed, "
            "or the ledger needs updating."
        )
    return claim


def _notebook_link(notebook, link_prefix):
    number = notebook.split("_", 1)[0]
    return f"[{number}]({link_prefix}{notebook}.ipynb)"


def ledger_markdown(claims=CLAIMS, link_prefix=""):
    """The ledger as one Markdown table: claim, kind, where it is tested, verdict.

    link_prefix: prepended to each notebook's file name in its link; "" when the table
    is shown inside notebooks/ (as in 00_start_here), "notebooks/" for the README.
    """
    lines = [
        "| claim | kind | tested in | verdict |",
        "|---|---|---|---|",
    ]
    for c in claims:
        where = _notebook_link(c.notebook, link_prefix)
        if c.section:
            where += f" · {c.section}"
        verdict = f"**{c.verdict}**" if c.verdict else "not yet tested"
        statement = c.statement.replace("|", "\\|")
        lines.append(f"| {statement} `{c.id}` | {c.kind} | {where} | {verdict} |")
    return "\n".join(lines)


def verdict_table(evidence, claims=CLAIMS):
    """A notebook's closing table as Markdown: claim, the evidence this run measured, verdict.

    evidence: {claim_id: text}, the text built from the run's own numbers.
    """
    lines = ["| claim | evidence (this run) | verdict |", "|---|---|---|"]
    for claim_id, text in evidence.items():
        claim = get_claim(claim_id, claims)
        lines.append(f"| {claim.statement} | {text} | **{claim.verdict}** |")
    return "\n".join(lines)
