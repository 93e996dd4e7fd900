"""The pictures: the data-scaling curve reads the recipe sweep's keys right, and every plot writes a PNG."""
import pytest

from minblip2.tools.plots import data_scaling, plot_losses, query_collapse, scaling_points


def _ret(tr, ir):
    return {"TR@1": tr, "IR@1": ir, "TR@5": 0.0, "IR@5": 0.0}


SWEEP = {  # the shapes of results/recipe-sweep.json's entries, with made-up numbers
    "baselines/s1337": {"nearest_neighbour": {"CIDEr": 12.0}, "linear_probe": _ret(30.0, 29.0)},
    "baselines_n60/s1337": {"nearest_neighbour": {"CIDEr": 11.0}, "linear_probe": _ret(14.0, 12.0), "n_train": 60},
    "n60_s1/s1337": {"retrieval_itc": _ret(13.0, 8.0), "retrieval_rerank": _ret(1.0, 1.0)},
    "rerank_main/s1337": {"k0": _ret(24.0, 25.0), "k16": _ret(2.0, 2.0)},
    "preset_s1/s2": {"retrieval_itc": _ret(27.0, 23.0)},
    "random_360/s1": {"val_captions": {"CIDEr": 17.0}},
    "random_360/s2": {"val_captions": {"CIDEr": 19.0}},
    "random_360_n60/s1337": {"val_captions": {"CIDEr": 21.0}},
    "q8_s1/s1": {"retrieval_itc": _ret(99.0, 99.0)},  # another recipe: not on the curve
    "main_360/s1": {"val_captions": {"CIDEr": 99.0}},
}


def test_scaling_points_reads_each_method_at_each_size():
    pts = scaling_points(SWEEP)
    assert pts["TR@1"] == {"linear probe": {480: [30.0], 60: [14.0]},
                           "Q-Former": {60: [13.0], 480: [24.0, 27.0]}}  # ITC ranking; the main job's is a seed
    assert pts["IR@1"]["Q-Former"] == {60: [8.0], 480: [25.0, 23.0]}
    assert pts["CIDEr"] == {"nearest-neighbour caption": {480: [12.0], 60: [11.0]},
                            "stage 2 from a random Q-Former": {480: [17.0, 19.0], 60: [21.0]}}


def test_plots_write_pngs(tmp_path):
    fig = data_scaling(SWEEP, out_png=tmp_path / "scaling.png")
    assert len(fig.axes) == 3 and (tmp_path / "scaling.png").stat().st_size > 0
    assert len(data_scaling(SWEEP, metrics=("TR@1", "IR@1")).axes) == 2
    with pytest.raises(ValueError, match="no data-scaling runs"):
        data_scaling({"q8_s1/s1": SWEEP["q8_s1/s1"]})
    (tmp_path / "log.csv").write_text("step,loss,loss_itc,lr\n" + "".join(f"{i},{5 - i / 10},{4 - i / 10},0.1\n"
                                                                        for i in range(1, 21)))
    fig = plot_losses(tmp_path / "log.csv", tmp_path / "losses.png")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["loss", "loss_itc"]
    assert (tmp_path / "losses.png").stat().st_size > 0


def test_query_collapse_plots_each_run_and_each_self_attention(tmp_path):
    def rows(cos):  # the row shape of diagnostics.query_cos_by_layer: 2 layers, cross-attention in the first
        names = ["L0.self", "L0.cross", "L0.ffn", "L1.self", "L1.ffn"]
        return [{"sublayer": n, "query_cos": cos, "added": 2.0, "added_cos": 0.5} for n in names]

    fig = query_collapse({"apart": rows(0.1), "collapsed": rows(1.0)}, tmp_path / "collapse.png")
    cos_ax, add_ax = fig.axes
    assert [list(line.get_ydata()) for line in cos_ax.get_lines()] == [[0.1] * 5, [1.0] * 5]
    assert [len(line.get_xdata()) for line in add_ax.get_lines()] == [2, 2]  # one point per self-attention
    assert (tmp_path / "collapse.png").stat().st_size > 0
