"""The `dpig` command: one Typer app, one module per command group."""

from __future__ import annotations

import typer

from cli import data, demo, eval, model, train

app = typer.Typer(
    name="dpig",
    help="Disentangled Person Image Generation: data, training and batch generation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(model.app, name="model")
app.add_typer(data.app, name="data")
app.add_typer(eval.app, name="eval")
app.command("train")(train.train)
app.command("demo")(demo.demo)

if __name__ == "__main__":
    app()
