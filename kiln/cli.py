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
    inspect.add_argument("--max-seq-len", type=int, default=2048, help="longest sequence to plan for")
    inspect.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def cmd_inspect(args) -> int:
    from .driver import capture_source, summarize
    from .progress import Progress

    if args.max_seq_len <= 0:
        raise UsageError(f"--max-seq-len must be positive, got {args.max_seq_len}")
    module, _ = capture_source(args.model, max_seq=args.max_seq_len, progress=Progress())
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
