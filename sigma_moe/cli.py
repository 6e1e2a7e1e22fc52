"""`sigma-moe` command line (also `python -m sigma_moe`). Each command's work lives in its
package; this file only parses arguments and reports errors by name.

Each command imports its package inside its handler, so `sigma-moe --help` and a bad argument
answer without loading torch / DeepSpeed (several seconds); nothing here dodges a cycle (cli.py
is the top layer of the import contracts in pyproject.toml)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import sigma_moe
from sigma_moe.errors import StopTraining


def _train(args: argparse.Namespace) -> int:
    from sigma_moe.config import load_config
    from sigma_moe.run import run_training  # the config picks the objective and the sampler

    cfg = load_config(args.config, args.set)
    if os.environ.get("WORLD_SIZE", "").isdigit():
        # Under a launcher the process count is known now: ep_size and the batch split are
        # checked with the rest of the config, before the process group or the run folder.
        cfg.check_world(int(os.environ["WORLD_SIZE"]))
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    if cfg.rho1.mode != "none":
        from sigma_moe.rho1.reference import check_reference_tokenizer

        # Before anything is built: a bad reference is one line, not a [rank0] traceback.
        check_reference_tokenizer(cfg.rho1.reference, cfg.data.tokenizer)
    run_training(cfg, out, resume=args.resume)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sigma_moe.experiments.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, rho1=not args.no_rho1, resume=args.resume)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sigma_moe.train.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.ckpt, json_path=args.json, set_overrides=args.set)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from sigma_moe.train.evaluate import check_generate_args, stream_text

    check_generate_args(args.prompt, args.max_new_tokens, args.temperature)  # before loading
    pieces = stream_text(args.ckpt, args.prompt, args.max_new_tokens, args.temperature, args.seed)
    try:
        for piece in pieces:  # tokens as they come
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:  # what was printed stays
        print(flush=True)
        print(
            "sigma-moe generate: interrupted; the text above is all that was generated",
            file=sys.stderr,
        )
        return 130
    print(flush=True)
    return 0


def _report(args: argparse.Namespace) -> int:
    from sigma_moe.train.callbacks import format_summary
    from sigma_moe.train.report import write_report

    run = Path(args.run_dir)
    page = write_report(run)
    if (run / "summary.json").is_file():
        print(format_summary(json.loads((run / "summary.json").read_text())))
    print(f"wrote {page}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from sigma_moe.export import export_hf

    out = export_hf(args.ckpt, args.out_dir, dtype=args.dtype)
    print(f"wrote {out} (transformers Qwen3-MoE, {args.dtype}): AutoModelForCausalLM and "
          "AutoTokenizer .from_pretrained load it")  # fmt: skip
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from sigma_moe.export import import_hf

    out = import_hf(args.hf_dir, args.out_ckpt, force=args.force)
    print(f"wrote {out} (step 0): sigma-moe train {out}/config.yaml --resume {out}")
    return 0


def _passthrough(module: str, func: str):
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args.rest) or 0

    return run


PASSTHROUGH = {
    # command: (module, function taking argv, help)
    "prepare-data": (
        "sigma_moe.data.prepare",
        "main",
        "tokenise text into Megatron indexed datasets",
    ),
    "train-tokenizer": (
        "sigma_moe.data.prepare",
        "train_tokenizer_main",
        "train a byte-level BPE tokenizer",
    ),
    "score": ("sigma_moe.rho1.score_cli", "main", "Rho-1 scorer: prefill a reference-loss store"),
    "mix-search": (
        "sigma_moe.mixing.regmix",
        "main",
        "RegMix pilot search: proxies on random mixtures → proposed data.domains weights",
    ),
    "convert-checkpoint": (
        "sigma_moe.train.reshape",
        "main",
        "reshape a checkpoint to another EP size",
    ),
}
BENCH = {
    "kernels": "sigma_moe.bench.kernels",
    "layer": "sigma_moe.bench.layer",
    "step": "sigma_moe.bench.step",
    "train": "sigma_moe.bench.train",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sigma-moe", description=sigma_moe.__doc__)
    p.add_argument("--version", action="version", version=f"sigma-moe {sigma_moe.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML recipe")
    t.add_argument("config", help="YAML recipe, e.g. configs/demo-cpu.yaml")
    t.add_argument("--out", help="run directory (default: runs/<config name>)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key; the value is parsed as YAML (lists work)",
    )
    t.add_argument("--resume", default="none", help="auto | PATH | none (default)")
    t.set_defaults(func=_train)

    d = sub.add_parser(
        "demo", help="bundled corpus → tokenizer → reference → MoE with and without Rho-1"
    )
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="training steps of each MoE run")
    d.add_argument("--no-rho1", action="store_true", help="only train the plain MoE")
    d.add_argument(
        "--resume", default="none", help="auto: continue every stage from its newest checkpoint"
    )
    d.set_defaults(func=_demo)

    e = sub.add_parser("eval", help="per-domain validation loss of a checkpoint")
    e.add_argument("ckpt", help="a run's checkpoints/ folder or one checkpoint folder")
    e.add_argument("--json", help="write {val_loss: {domain: ..}, clean_val_loss: ..} here")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.set_defaults(func=_eval)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("ckpt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64, help="1 .. 4096 (default 64)")
    g.add_argument("--temperature", type=float, default=0.8, help=">= 0; 0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_generate)

    r = sub.add_parser("report", help="RUN_DIR/report.html: plots of a run directory")
    r.add_argument("run_dir")
    r.set_defaults(func=_report)

    x = sub.add_parser("export-hf", help="checkpoint → transformers Qwen3-MoE folder")
    x.add_argument("ckpt", help="a run's checkpoints/ folder or one checkpoint folder")
    x.add_argument("out_dir")
    x.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    x.set_defaults(func=_export_hf)

    m = sub.add_parser("import-hf", help="transformers Qwen3-MoE folder → our checkpoint")
    m.add_argument("hf_dir")
    m.add_argument("out_ckpt")
    m.add_argument("--force", action="store_true", help="replace OUT_CKPT if it exists")
    m.set_defaults(func=_import_hf)

    for name, (mod, fn, help_) in PASSTHROUGH.items():
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=_passthrough(mod, fn))

    b = sub.add_parser("bench", help=f"benchmarks: {' | '.join(BENCH)}", add_help=False)
    b.add_argument("what", choices=sorted(BENCH), nargs="?")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench)
    return p


def _bench(args: argparse.Namespace) -> int:
    if args.what is None:
        print(f"usage: sigma-moe bench {{{','.join(sorted(BENCH))}}} [--json PATH] [--help]")
        return 2
    return importlib.import_module(BENCH[args.what]).main(args.rest) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in PASSTHROUGH:
        # argparse's REMAINDER does not take a leading option (`score --help`): hand the
        # command's own parser everything after the command name.
        args = argparse.Namespace(command=argv[0], rest=list(argv[1:]))
        args.func = _passthrough(*PASSTHROUGH[argv[0]][:2])
    else:
        args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        if os.environ.get("SIGMA_MOE_TRACEBACK"):
            raise
        print(f"sigma-moe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except StopTraining as e:
        # A run stopped on purpose (NaN policy, scorer, a stopped stage) or a checkpoint that
        # could not be written: the message names what to resume from; no traceback needed.
        if os.environ.get("SIGMA_MOE_TRACEBACK"):
            raise
        print(f"sigma-moe {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # a second Ctrl-C: stopped at once
        print(
            f"sigma-moe {args.command}: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
