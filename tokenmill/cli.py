"""tokenmill command line: generate | chat | serve | bench | plan."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tokenmill: an LLM inference engine built around the memory wall.")
bench_app = typer.Typer(no_args_is_help=True, help="Measure tokenmill on this machine.")
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
