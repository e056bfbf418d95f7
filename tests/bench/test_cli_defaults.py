"""What `peftmed bench` with no arguments runs: the transfer protocol on phantom, so that accuracies
after a short budget compare methods adapting a trained backbone, not random weights."""

from peftmed.bench.cli import build_config
from peftmed.cli import build_parser


def config_for(*argv):
    args = build_parser().parse_args(["bench", *argv])
    return build_config(args)


def test_no_arguments_pretrains_on_ct_and_adapts_to_mr():
    config = config_for()
    assert (config.backbone, config.dataset) == ("miss-tiny", "phantom")
    assert config.transfer == ({"domain": "ct"}, {"domain": "mr"})
    assert config.steps == 200 and config.batch_size == 16 and config.source_steps == 600 and config.source_lr == 2e-3
    assert config.eval_samples is None  # every phantom test question: 1,200, a 95% interval of about +-0.028


def test_no_transfer_and_other_datasets_adapt_directly():
    assert config_for("--no-transfer").transfer is None
    assert config_for("--no-transfer").steps == 40 and config_for("--no-transfer").batch_size == 8
    assert config_for("--dataset", "vqa-rad").transfer is None
    assert config_for("--transfer", "domain=mr", "domain=ct").transfer == ({"domain": "mr"}, {"domain": "ct"})


def test_report_suite_gets_the_longer_budget():
    config = config_for("--suite", "irg")
    assert config.dataset == "phantom-report" and config.transfer is None
    assert (config.steps, config.batch_size) == (300, 16)
