"""`make demo`'s code path end to end, with the tiny recipe and a 2-epoch scVI (minutes become seconds)."""

from pathlib import Path

import pandas as pd
import pytest

from scldm_hf.demo import run_demo

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.filterwarnings("ignore:Skipped conditions")
def test_demo_trains_generates_evaluates_and_writes_the_report(tmp_path):
    report = run_demo(tmp_path, TINY, seed=0, guidance_scale=1.0, scvi_epochs=2)

    html = report.read_text()
    assert report == tmp_path / "report.html"
    for model in ("scLDM", "scVI", "naive NB"):
        assert model in html
    assert html.count("<img") >= 3, "UMAP, gene moments and marker dot plot"
    assert (tmp_path / "scldm" / "pipeline" / "model_index.json").is_file()

    summary = pd.read_csv(tmp_path / "metrics.csv", index_col="model")
    assert list(summary.index) == ["real (held-out sample)", "scLDM", "scVI", "naive NB"]
    floor = summary.loc["real (held-out sample)"]
    # a second real sample is the floor: indistinguishable from the test cells, closer than any generator here
    assert 0.35 < floor["nn_accuracy"] < 0.65
    assert floor["mmd_rbf"] < summary.drop(index="real (held-out sample)")["mmd_rbf"].min()
    assert (summary["wall_time_s"].drop(index="real (held-out sample)") > 0).all()
