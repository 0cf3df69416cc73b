"""The Flower ServerApp: reads the run config and hands the Grid to ServerRunner."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.app import run_config_flag, run_config_from_context
from fedtune.runconfig import RunConfig

from .runner import ServerRunner


def make_server_app(cfg: RunConfig | None = None, out: Path | None = None, resume: bool = False, progress: bool = True) -> ServerApp:
    """A ServerApp for `cfg` writing into `out` (None: both from the Flower run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else run_config_from_context(context)
        out_dir = out if out is not None else Path(str(context.run_config.get("out", "runs/flwr")))
        do_resume = resume or run_config_flag(context, "resume", False)
        show = progress and run_config_flag(context, "progress", True)
        ServerRunner(run_cfg, out_dir, do_resume, show).run(grid)

    return app


app = make_server_app()
