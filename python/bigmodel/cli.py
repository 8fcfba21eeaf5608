"""The `bigmodel` command line: inspect, list, verify and pack stores; run the demo.

    bigmodel inspect STORE [--json]
    bigmodel ls STORE [--pattern GLOB] [--json]
    bigmodel verify STORE [--json]
    bigmodel pack SRC DEST [--codec zstd] [--shard-size 2GB]
    bigmodel demo [...]

STORE is a store directory, a safetensors file, or an accelerate offload folder (the last
two are served in place). Exit status: 0 success, 1 verification failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections import Counter
from collections.abc import Sequence

from bigmodel import checkpoints
from bigmodel.errors import StoreError
from bigmodel.store import TensorStore, write_store

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def _summary(store: TensorStore) -> dict:
    infos = [store.info(name) for name in store]
    raw = sum(i["nbytes"] for i in infos)
    stored = sum(i["stored_nbytes"] for i in infos)
    files = store.files()
    dtype_bytes: Counter[str] = Counter()
    for info in infos:
        dtype_bytes[str(info["dtype"]).removeprefix("torch.")] += info["nbytes"]
    return {
        "store": store.location,
        "tensors": len(infos),
        "raw_bytes": raw,
        "stored_bytes": stored,
        "compression_ratio": raw / stored if stored else 1.0,
        "files": len(files),
        "mounts": [f["path"] for f in files if f["mounted"]],
        "dtypes": dict(Counter(str(i["dtype"]).removeprefix("torch.") for i in infos)),
        "dtype_bytes": dict(dtype_bytes),
        "codecs": dict(Counter(i["codec"] for i in infos)),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    with checkpoints.open_store(args.store) as store:
        summary = _summary(store)
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    print(f"store:        {summary['store']}")
    print(f"tensors:      {summary['tensors']}")
    print(
        f"bytes:        {_human(summary['raw_bytes'])} raw, {_human(summary['stored_bytes'])} "
        f"stored (compression ratio {summary['compression_ratio']:.2f})"
    )
    print(f"files:        {summary['files']} ({len(summary['mounts'])} mounted)")
    for mount in summary["mounts"]:
        print(f"  mount:      {mount}")
    for dtype, count in sorted(summary["dtypes"].items()):
        print(f"dtype {dtype:<8} {count} tensors, {_human(summary['dtype_bytes'][dtype])}")
    for codec, count in sorted(summary["codecs"].items()):
        print(f"codec {codec:<8} {count} tensors")
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    with checkpoints.open_store(args.store) as store:
        rows = [
            {"name": name, **store.info(name)}
            for name in store
            if args.pattern is None or fnmatch.fnmatchcase(name, args.pattern)
        ]
    for row in rows:
        row["dtype"] = str(row["dtype"]).removeprefix("torch.")
        row["shape"] = list(row["shape"])
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        size = _human(r["nbytes"])
        print(f"{r['name']:<{width}}  {r['dtype']:<14} {shape:<20} {size:>10}  {r['codec']}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    with checkpoints.open_store(args.store) as store:
        bad = store.verify()
        count = len(store)
    if args.json:
        print(json.dumps({"tensors": count, "corrupt": bad}, indent=2))
    elif bad:
        print(f"{len(bad)} of {count} tensors fail their checksum:")
        for name in bad:
            print(f"  {name}")
    else:
        print(f"all {count} tensors match their checksums")
    return EXIT_VERIFY_FAILED if bad else EXIT_OK


def cmd_pack(args: argparse.Namespace) -> int:
    with checkpoints.open_source(args.src) as source:
        write_store(args.dest, source, codec=args.codec, shard_size=args.shard_size)
    print(f"packed {args.src} into {args.dest}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from bigmodel import demo

    return demo.main(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigmodel", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("inspect", cmd_inspect, "summarise a store: tensors, bytes, files, dtypes, codecs"),
        ("ls", cmd_ls, "one row per tensor"),
        ("verify", cmd_verify, "check every checksum (exit 1 on failure)"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("store", help="store directory, safetensors file or offload folder")
        command.add_argument("--json", action="store_true", help="machine-readable output")
        command.set_defaults(func=func)
    sub.choices["ls"].add_argument("--pattern", help="only names matching this glob")
    pack = sub.add_parser("pack", help="write a checkpoint or offload folder as a store")
    pack.add_argument(
        "src", help="safetensors file or folder, .bin checkpoint, offload folder, store"
    )
    pack.add_argument("dest", help="directory of the new store")
    pack.add_argument("--codec", choices=("none", "zstd"), default="none")
    pack.add_argument("--shard-size", default="2GB")
    pack.set_defaults(func=cmd_pack)
    demo = sub.add_parser(
        "demo", help="disk-offloaded inference of a model bigger than its RAM budget"
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, help="see `bigmodel demo --help`")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (StoreError, OSError, ValueError, TypeError) as err:
        print(f"bigmodel: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
