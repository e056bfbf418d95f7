"""What `peftmed bench` with no arguments runs: the transfer protocol on phantom, so that accuracies
after a short budget compare methods adapting a trained backbone, not random weights."""

from peftmed.bench.cli import build_config
from peftmed.cli import build_parser


def config_for(*argv):
    args = build_parser().parse_args(["bench", *argv])
    return build_config(args)


def test_no_arguments_pretrains_on_ct_and_adapts_to_mr_with_three_seeds():
    config = config_for()
    assert (config.backbone, config.dataset) == ("miss-tiny", "phantom")
    assert config.transfer == ({"domain": "ct"}, {"domain": "mr"})
    assert config.steps == 120 and config.batch_size == 16 and config.source_steps == 400 and config.source_lr == 2e-3
    # three source models (seeds), each adapted by every recipe; 600 MR and 300 CT test questions per model
    assert config.seed_list == (0, 1, 2) and config.eval_samples == 600 and config.source_eval_samples == 300
    assert config.threads == 1  # fixed: figures do not depend on the machine's core count
    assert config_for("--seed", "4").seed_list == (4,)


def test_no_transfer_and_other_datasets_adapt_directly():
    assert config_for("--no-transfer").transfer is None
    assert config_for("--no-transfer").steps == 40 and config_for("--no-transfer").batch_size == 8
    assert config_for("--dataset", "vqa-rad").transfer is None
    assert config_for("--transfer", "domain=mr", "domain=ct").transfer == ({"domain": "mr"}, {"domain": "ct"})


def test_report_suite_gets_the_longer_budget():
    config = config_for("--suite", "irg")
    assert config.dataset == "phantom-report" and config.transfer is None
    assert (config.steps, config.batch_size) == (300, 16)
