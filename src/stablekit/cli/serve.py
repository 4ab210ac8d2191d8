"""``stablekit serve``: the HTTP service and web studio."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import StablekitError
from .common import MODEL_HELP


@click.command("serve")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (not loopback: needs a token).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--token-file",
    type=click.Path(path_type=Path),
    default=None,
    help="File whose first line is the token clients must send (Bearer, or as the HTTP Basic password).",
)
@click.option("--max-queue", default=32, show_default=True, type=click.IntRange(min=1), help="Jobs that may wait.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Jobs database and images [default: $XDG_DATA_HOME/stablekit/serve].",
)
@click.option("--device", default=None, help="cuda, mps or cpu [default: the best available].")
def serve(model, host, port, token_file, max_queue, data_dir, device):
    """Run the HTTP service: the native API (/docs), the AUTOMATIC1111 API (/sdapi/v1) and the studio (/)."""
    from .. import serve as service

    settings = service.Settings(
        data_dir=data_dir or service.default_data_dir(),
        model=model,
        device=device,
        token=service.read_token(token_file),
        max_queue=max_queue,
    )
    if settings.token is None and not service.is_loopback(host):
        raise StablekitError(f"--host {host} is reachable from other machines: give --token-file, or bind 127.0.0.1")
    service.run(settings, host, port)
