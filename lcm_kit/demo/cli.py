"""``python -m lcm_kit.demo``: parse the command line, load the model once, serve the page on localhost."""

from __future__ import annotations

import argparse
from pathlib import Path

from .app import Session, build_app

# the committed full LCM of a source checkout (the models are not part of the installed package)
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-emoji-lcm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lcm_kit.demo", description=__doc__)
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="a full LCM pipeline folder, or the teacher folder of --lora (default: %(default)s)")
    parser.add_argument("--lora", default=None, help="an LCM-LoRA (.safetensors file or folder) for --model")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="guidance (w + 1); default: the middle of the student's distilled range, else 1.0 "
                             "for an LCM-LoRA and 8.5 for a full LCM without one")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, block: bool = True):
    """Loads the model and serves the page; a model that fails to load is reported in the page (and the log).

    Returns the Gradio app (with ``block=False`` the server runs in a thread until ``app.close()``)."""
    args = parse_args(argv)
    session = Session()
    status = session.load(args.model, args.lora, args.guidance_scale)
    app = build_app(session, status)
    app.queue(default_concurrency_limit=1)
    print(f"lcm_kit demo: {status}\nServing http://{args.host}:{args.port} (Ctrl+C stops it)", flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=False, prevent_thread_lock=not block,
               quiet=True)  # fmt: skip
    return app
