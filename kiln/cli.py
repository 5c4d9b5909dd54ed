"""The `kiln` command line: compile, run, chat and inspect models."""

from __future__ import annotations

import argparse
import json
import sys

from kiln import __version__


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kiln", description="kiln: compile language models and run them.")
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    inspect = sub.add_parser("inspect", help="show what kiln makes of a model",
                             description="Capture MODEL and summarise its kiln IR.")
    inspect.add_argument("model", metavar="MODEL",
                         help="'smollm2', a .gguf file, a Hugging Face checkpoint dir, or an artifact dir")
    inspect.add_argument("--print-ir", action="store_true", help="print the whole IR text")
    inspect.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_plan_options(inspect)
    inspect.add_argument("--print-after", metavar="PASS|all", help="print the IR after this pass (or all)")
    inspect.add_argument("--stop-after", metavar="PASS", help="stop the pipeline after this pass")
    inspect.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def add_plan_options(parser) -> None:
    group = parser.add_argument_group("planning")
    group.add_argument("--max-seq-len", type=int, default=2048, help="longest sequence (prompt + new tokens)")
    group.add_argument("--max-num-seqs", type=int, default=4, help="sequences the KV cache holds at once")
    group.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    group.add_argument("--kv-cache-dtype", choices=["f32", "f16"], default="f32", help="KV-cache element type")
    group.add_argument("--kv-cache-budget", metavar="BYTES", help="KV-cache memory budget, e.g. 512MiB")


def parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgib")
    unit = raw[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise UsageError(f"cannot read {text!r} as a size; write e.g. 1073741824, 512MiB or 2GB") from None
    if value <= 0:
        raise UsageError(f"a memory budget must be positive, got {text!r}")
    return int(value)


def pass_options(args):
    from kiln.passes import PassOptions

    for flag in ("max_seq_len", "max_num_seqs", "page_size"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    budget = parse_bytes(args.kv_cache_budget) if args.kv_cache_budget else None
    return PassOptions(max_seq_len=args.max_seq_len, max_num_seqs=args.max_num_seqs, page_size=args.page_size,
                       kv_cache_dtype=args.kv_cache_dtype, memory_budget_bytes=budget,
                       activation_seq_len=min(args.max_seq_len, 128))


def cmd_inspect(args) -> int:
    from .driver import capture_source, summarize
    from .progress import Progress

    from .driver import optimize

    options = pass_options(args)
    progress = Progress()
    module, _ = capture_source(args.model, max_seq=args.max_seq_len, progress=progress)
    optimize(module, options, print_after=args.print_after, stop_after=args.stop_after, progress=progress)
    summary = summarize(module)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    if args.print_ir:
        from kiln.ir.printer import print_module

        print(print_module(module), end="")
    return 0


def format_summary(summary: dict) -> str:
    lines = [f"model: {summary['model']}",
             f"parameters: {summary['parameters']:,} ({summary['parameter_bytes'] / 2**20:.1f} MiB)",
             f"symbolic dims: {', '.join(summary['symbolic_dims'])}",
             "entry functions:"]
    for name, info in summary["functions"].items():
        params = ", ".join(f"{k}: {v}" for k, v in info["params"].items())
        lines.append(f"  @{name}({params}) -> {', '.join(info['results'])}  [{info['nodes']} nodes]")
    lines.append(f"ops in @{summary['ops_function']}:")
    for op, count in summary["ops"].items():
        lines.append(f"  {op:<16} {count}")
    unfused = summary.get("unfused_attention") or []
    lines.append("attention: all fused" if not unfused else f"attention: {len(unfused)} left unfused:")
    lines.extend(f"  - {reason}" for reason in unfused)
    kv = summary.get("kv_cache")
    if kv:
        lines.append(f"KV cache: {kv['layout']} = [{kv['num_layers']}, 2, {kv['num_pages']}, {kv['num_kv_heads']}, "
                     f"{kv['page_size']}, {kv['head_dim']}] {kv['dtype']}")
        lines.append(f"  {kv['bytes_per_token']:,} bytes per token, {kv['max_tokens']:,} tokens "
                     f"({kv['total_bytes'] / 2**20:.1f} MiB), {kv['pages_per_seq']} pages per sequence of "
                     f"{kv['max_seq_len']}")
    acts = summary.get("activations")
    if acts:
        lines.append("activation memory:")
        for name, plan in acts["functions"].items():
            env = ", ".join(f"{k}={v}" for k, v in plan.get("env", {}).items())
            lines.append(f"  @{name} ({env}): peak {plan['peak_bytes'] / 2**20:.2f} MiB vs naive "
                         f"{plan['naive_bytes'] / 2**20:.2f} MiB")
    if summary.get("passes"):
        lines.append("passes:")
        for rec in summary["passes"]:
            lines.append(f"  {rec['name']:<34} {rec['milliseconds']:9.1f} ms  "
                         f"{'modified' if rec['modified'] else '-'}")
    return "\n".join(lines)


COMMANDS = {"inspect": cmd_inspect}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(f"kiln: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - user errors print one line; --debug shows the traceback
        from kiln.ir.errors import KilnError

        if debug:
            raise
        if isinstance(err, KilnError):
            print(f"kiln: error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, (OSError, KeyboardInterrupt)):
            print(f"kiln: error: {err}", file=sys.stderr)
            return 2
        print(f"kiln: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
