"""The ``edge-agent model`` commands' arguments, apart from the model tool itself.

``edge_agent.cli`` builds every command's parser at each start; keeping these here means
``edge-agent run`` (and ``status``, ``install``) never import the model tool, which only
``edge-agent model ...`` uses.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def _tool(name: str) -> Callable[[argparse.Namespace], int]:
    """``edge_agent.model_tool.<name>``, imported when the command runs."""

    def run(args: argparse.Namespace) -> int:
        from edge_agent import model_tool

        return int(getattr(model_tool, name)(args))

    return run


def add_parser(sub: Any) -> None:
    """``edge-agent model init | check | schema`` (``edge_agent.model_tool`` runs them)."""
    m = sub.add_parser("model", help="make a manifest for a .tflite model, check one, print the schema")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    i = msub.add_parser("init", help="inspect a .tflite model and write a manifest the agent takes")
    i.add_argument("model", metavar="MODEL.tflite")
    i.add_argument("--out", required=True, metavar="MANIFEST.json", help="the model is copied beside it")
    i.add_argument("--score", choices=["class", "max", "sum", "one_minus", "reconstruction"])
    i.add_argument("--score-class", type=int, help="the class index that is the score (kind class/one_minus)")
    i.add_argument("--classes", help="comma-separated class indices for --score max/sum")
    i.add_argument("--score-tensor", help="the tensor the score comes from (default: picked)")
    i.add_argument(
        "--embedding", help="the tensor uploaded for a kept window, any in the model; 'none': the score's"
    )
    i.add_argument("--pool", choices=["flatten", "mean", "max"])
    i.add_argument(
        "--preprocess", help="a registry stage (identity, spectrum, log_mel, mfcc, image) or module:function"
    )
    i.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a stage parameter")
    i.add_argument("--window", help="one raw window's shape, e.g. 16000 or 96,96,3 (default: the input's)")
    i.add_argument("--sample-rate", type=float)
    i.add_argument("--threshold", type=float, help="default: suggested from the windows")
    i.add_argument(
        "--windows", metavar="FILE.npy", help="real windows: the threshold and int8 scale from them"
    )
    i.add_argument("--keep", type=float, default=0.1, help="share of windows the suggested threshold keeps")
    i.add_argument("--labels", help="comma-separated, or a file with one label a line")
    i.add_argument("--name")
    i.add_argument("--version", default="1.0.0")
    i.set_defaults(fn=_tool("cmd_init"))
    c = msub.add_parser("check", help="load a manifest as the agent does and run it on windows")
    c.add_argument("manifest", metavar="MANIFEST.json")
    c.add_argument("--windows", metavar="FILE.npy", help="[n, *window] float32 (default: generated)")
    c.add_argument("--keep", type=float, default=0.1)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--seconds", type=float, default=1.0, help="how long to measure samples/s")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=_tool("cmd_check"))
    s = msub.add_parser("schema", help="print the manifest's JSON Schema")
    s.set_defaults(fn=_tool("cmd_schema"))
