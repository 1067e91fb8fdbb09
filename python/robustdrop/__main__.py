"""``python -m robustdrop <command>``: run ``python -m robustdrop --help`` for the commands.

Each command is a module with ``HELP`` (one line), ``add_arguments(parser)``
and ``main(args) -> int``; the module docstring is the command's description.
Adding a command is writing that module and adding one line to COMMANDS.
"""
import argparse
import importlib
import sys

COMMANDS = {
    "bench": "robustdrop.benchmark",
    "bench-steps": "robustdrop.step_benchmark",
    "bench-subnets": "robustdrop.subnet_benchmark",
    "info": "robustdrop.info",
    "masks": "robustdrop.masks",
    "robustness": "robustdrop.robustness",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m robustdrop",
                                     description="robustdrop: fused kernels for structured and guided dropout.")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        description = (module.__doc__ or "").strip().split("\n\n")[0]
        sub = commands.add_parser(name, help=module.HELP, description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
