"""The `dpig` command: one Typer app, one module per command group."""

from __future__ import annotations

import typer

from cli import api, data, demo, eval, export, jobs, model, train, worker

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
jobs.register(app)
app.command("export")(export.export)
app.command("api")(api.api)
app.add_typer(api.keys_app, name="keys")
app.command("worker")(worker.worker)
app.command("dispatcher")(worker.dispatcher)

if __name__ == "__main__":
    app()
