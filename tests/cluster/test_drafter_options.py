"""Drafter options are validated where the drafter is built, with a one-line error.

``proposal_top_k=0`` used to reach the Markov kernel, which then built a dense q without ids
that ``DraftBlock`` rejects: every sampled request crashed the verifier step.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dspark.cli import main
from dspark.cluster.config import ClusterConfig
from dspark.workers.drafters.base import proposal_top_k


def test_proposal_top_k_accepts_positive_integers():
    assert proposal_top_k({}) == 8
    assert proposal_top_k({"proposal_top_k": 3}) == 3
    assert proposal_top_k({"proposal_top_k": "16"}) == 16


@pytest.mark.parametrize("bad", [0, -1, "0", "abc", 2.5, ""])
def test_proposal_top_k_refuses_what_cannot_be_served(bad):
    with pytest.raises(ValueError, match="proposal_top_k must be an integer >= 1"):
        proposal_top_k({"proposal_top_k": bad})


def test_cluster_config_refuses_dense_proposals():
    with pytest.raises(ValueError, match="proposal_top_k"):
        ClusterConfig.from_args({"draft": "dspark", "draft_options": {"proposal_top_k": 0}})
    # Without a drafter the option is irrelevant and nothing is checked.
    ClusterConfig.from_args({"draft": "none", "draft_options": {"proposal_top_k": 0}})


@pytest.mark.parametrize("draft", ["dspark", "layerskip"])
def test_generate_refuses_proposal_top_k_zero_in_one_line(draft):
    res = CliRunner().invoke(
        main,
        ["generate", "hi", "--draft", draft, "--draft-option", "proposal_top_k=0", "--max-tokens", "4",
         "--temperature", "0.7", "--dtype", "fp32"],
    )
    assert res.exit_code != 0
    assert "proposal_top_k must be an integer >= 1" in res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
