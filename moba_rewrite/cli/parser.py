"""The command line: argparse parsers for every command, with the one-line error format and
exit code 2 for usage errors. Each command's `func` is its `cmd_*` function."""

from __future__ import annotations

import argparse
import sys

from moba_rewrite.cli.artifacts import FORMATS
from moba_rewrite.cli.errors import EXIT_USAGE, PROG
from moba_rewrite.cli.eval_cmd import add_calibrate_parser, add_eval_parser
from moba_rewrite.cli.generate_cmd import add_generate_parser
from moba_rewrite.cli.inspect_cmd import cmd_inspect
from moba_rewrite.cli.misc_cmd import cmd_bench, cmd_demo, cmd_routes
from moba_rewrite.cli.policy_cmd import cmd_policy_check, cmd_policy_init, cmd_policy_schema
from moba_rewrite.cli.rewrite_cmd import cmd_rewrite


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and requested output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _add_input(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("checkpoint", metavar="CKPT",
                       help="Hugging Face model directory, .safetensors file (with --config), .pt2 program, "
                            "or .pt file")
    p.add_argument("--config", metavar="FILE", help="config.json for a .safetensors / state-dict .pt input "
                                                    "(default: the one beside it)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickled full-module .pt input (unpickling runs code from the file)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code shipped with the checkpoint (transformers trust_remote_code)")
    p.add_argument("--allow-random-init", action="store_true",
                   help="load even when weights are missing or shaped unlike the config: initialise those "
                        "randomly and ignore unexpected ones (the result is not the trained model)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="load the weights in this dtype (default: as transformers does)")


def _leaf(sub, name: str, func, leaves: list, **kwargs) -> argparse.ArgumentParser:
    """A command's parser that runs `func`; `build_parser` adds the common flags last to each."""
    p = sub.add_parser(name, **kwargs)
    p.set_defaults(func=func)
    leaves.append(p)
    return p


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} if it exists")


def build_parser() -> argparse.ArgumentParser:
    from moba_rewrite import __version__

    parser = _Parser(prog=PROG, description="Rewrite the attention of PyTorch models into MoBA (Mixture of Block "
                                            "Attention), per layer, from a policy file.",
                     epilog="Exit codes: 0 ok, 1 internal error, 2 usage, 3 missing/corrupt checkpoint, 4 unknown "
                            "architecture or unsupported model, 5 bad policy, 6 output exists, 7 output not "
                            "writable, 8 bad option value, 9 pickle refused, 10 verification failed, 11 export "
                            "failed, 12 missing package, 130 interrupted, 143 terminated. See docs/CLI.md.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    leaves: list[argparse.ArgumentParser] = []

    p = _leaf(sub, "inspect", cmd_inspect, leaves, help="list the attention sites of a checkpoint",
              description="List every attention site (name, class, layer, heads, head dim, causality, "
                          "mask) and the model's size.")
    _add_input(p)
    p.add_argument("--seq-len", type=_positive, metavar="N", help="tokens in the probe input (default 32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pp = sub.add_parser("policy", help="write, check or describe policy files",
                        description="Policy files: a starter for a model, validation, the JSON schema.")
    psub = pp.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=_Parser)
    psub.required = True
    p = _leaf(psub, "init", cmd_policy_init, leaves, help="write a commented starter policy for a checkpoint",
              description="Write a starter policy (YAML) listing the checkpoint's attention sites.")
    _add_input(p)
    p.add_argument("-o", "--out", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--seq-len", type=_positive, metavar="N", help="tokens in the probe input (default 32)")
    _add_force(p, "FILE")
    p = _leaf(psub, "check", cmd_policy_check, leaves, help="validate a policy (and show its decisions for a model)",
              description="Validate a policy file; with --model, show the decision for every site.")
    p.add_argument("policy", metavar="POLICY", help="policy file (.yaml, .yml, .toml, .json)")
    p.add_argument("model_positional", nargs="?", metavar="CKPT",
                   help="show the decisions for this checkpoint's sites (same as --model)")
    p.add_argument("--model", metavar="CKPT", help="show the decisions for this checkpoint's sites")
    _add_input(p, positional=False)
    p.add_argument("--seq-len", type=_positive, metavar="N", help="tokens in the probe input")
    p.add_argument("--json", action="store_true", help="print the decisions as JSON")
    p = _leaf(psub, "schema", cmd_policy_schema, leaves, help="print the policy format's JSON schema",
              description="Print (or write) the JSON schema of policy files.")
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    _add_force(p, "FILE")

    p = _leaf(sub, "rewrite", cmd_rewrite, leaves, help="rewrite a checkpoint and write hf / pt2 / aoti / onnx",
              description="Rewrite the checkpoint's attention per the policy, write the artifact "
                          "atomically, load it back and compare it with the in-memory rewritten model.")
    _add_input(p)
    p.add_argument("--policy", required=True, metavar="POLICY", help="policy file (.yaml, .yml, .toml, .json)")
    p.add_argument("--out", required=True, metavar="OUT", help="output path (a directory for hf, a file otherwise)")
    p.add_argument("--format", default="hf", choices=FORMATS,
                   help="hf: checkpoint directory for mr.load; pt2: torch.export program; aoti: AOTInductor "
                        "package; onnx: ONNX model (default hf)")
    p.add_argument("--seq-len", type=_positive, metavar="N",
                   help="tokens in the sample input used to export and verify (default: (top_k+1) blocks, "
                        "within the model's limit); must be at least one MoBA block")
    p.add_argument("--dynamic", action="store_true", help="dynamic sequence length in pt2 / aoti / onnx")
    p.add_argument("--generate", action="store_true",
                   help="pt2 / aoti / onnx (a folder): write prefill and decode programs over a static KV cache "
                        "(Hugging Face decoders; run them with `moba-rewrite generate`)")
    p.add_argument("--max-seq-len", type=_positive, metavar="N",
                   help="with --generate: cache slots, i.e. prompt plus new tokens (required)")
    p.add_argument("--batch", type=_positive, default=1, metavar="B",
                   help="with --generate: prompts per call (default 1; fewer are padded)")
    p.add_argument("--onnx-body", choices=("sparse", "dense"), default="sparse",
                   help="onnx: the MoBA function body: sparse (default; memory O(T * top_k * block_size)) "
                        "or dense (the plain O(T^2) statement of the algorithm)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    _add_force(p, "OUT")
    p.add_argument("--no-verify", action="store_true", help="skip loading the artifact back and comparing")
    p.add_argument("--report-json", metavar="FILE", help="also write the rewrite report as JSON")

    p = _leaf(sub, "demo", cmd_demo, leaves, help="the whole path on a small built-in Llama checkpoint",
              description="Build a small Llama-architecture checkpoint with random weights, inspect it, "
                          "rewrite it with the hybrid policy, torch.compile it, run a long-ish prompt "
                          "eagerly and compiled, export pt2 and onnx, and print the report, timings and "
                          "file locations.")
    p.add_argument("--out", metavar="DIR", help="work folder (default: a new temporary folder, kept)")
    p.add_argument("--seq-len", type=_positive, default=None, metavar="N", help="prompt length (default 8192, where MoBA beats dense on a 2-core CPU)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--force", action="store_true", help="reuse DIR if it exists")

    p = _leaf(sub, "bench", cmd_bench, leaves, help="time MoBA against dense attention on this device",
              description="Run the attention benchmark (benchmarks/bench_attention.py: MoBA vs causal "
                          "scaled_dot_product_attention, time and peak memory) for the current device and "
                          "print the table. In an installed package without benchmarks/, a built-in "
                          "forward-time table.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seq-lens", default=None, metavar="N,N,...", help="sequence lengths to time")
    p.add_argument("--block-size", type=_positive, default=512, metavar="B", help="MoBA block size (default 512)")
    p.add_argument("--top-k", type=_positive, default=3, metavar="K", help="MoBA top-k (default 3)")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--quick", action="store_true", help="two sizes, one repeat")
    p.add_argument("--builtin", action="store_true", help="the built-in forward-only table (no subprocesses)")
    p.add_argument("--plot", metavar="PNG", help="also draw the timings")
    _add_force(p, "PNG")

    p = _leaf(sub, "routes", cmd_routes, leaves, help="draw which key blocks each query block selected",
              description="Rewrite the checkpoint with the policy, run a sample input and draw, per MoBA "
                          "layer and head, which key blocks each query block routed to.")
    _add_input(p)
    p.add_argument("--policy", required=True, metavar="POLICY", help="policy file")
    p.add_argument("--out", required=True, metavar="PNG", help="image to write")
    p.add_argument("--seq-len", type=_positive, metavar="N", help="tokens in the sample input")
    p.add_argument("--heads", type=_positive, default=4, metavar="H", help="heads drawn per layer (default 4)")
    _add_force(p, "PNG")
    add_eval_parser(sub, leaves, _leaf, _add_input, _add_force, _positive)
    add_calibrate_parser(sub, leaves, _leaf, _add_input, _add_force, _positive)
    add_generate_parser(sub, leaves, _leaf, _positive)
    for p in leaves:
        _add_common(p)
    return parser
