"""The `bigmodel` command line: inspect, list, verify and pack stores; run the demo.

    bigmodel inspect STORE [--json]
    bigmodel ls STORE [--pattern GLOB] [--json]
    bigmodel verify STORE [--json]
    bigmodel pack SRC DEST [--codec zstd] [--shard-size 2GB] [--force]
    bigmodel demo [--budget 600MB] [--tokens 16] [--dir DIR]

STORE is a store directory, a safetensors file, or an accelerate offload folder (the last
two are served in place). Exit status: 0 success; 1 verification failed, a file of the
store is missing or truncated (inspect and ls still list what the index holds), or ls
matched nothing; 2 bad input; 130 interrupted (Ctrl-C); 141 the output was closed early.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bigmodel import _core, checkpoints, demo
from bigmodel.checkpoints import IndexListing
from bigmodel.errors import StoreError
from bigmodel.sizes import format_size, size_option
from bigmodel.store import TensorStore, write_store

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE


def _open_or_list(path: str) -> TensorStore | IndexListing:
    """The store at ``path`` or, when some of its files are missing or truncated, the
    listing of its index (the problems are reported on stderr)."""
    try:
        return checkpoints.open_store(path)
    except (StoreError, OSError):  # damaged files; not NotAStoreError, which is bad input
        listing = checkpoints.read_listing(path)
        if listing is None or not listing.problems:
            raise
    for problem in listing.problems:
        print(f"bigmodel: {problem}", file=sys.stderr)
    return listing


def _summary(store: TensorStore | IndexListing) -> dict:
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


def _damage(store: TensorStore | IndexListing | None) -> list[dict]:
    """The damaged files of a listing, for output."""
    return [dataclasses.asdict(problem) for problem in getattr(store, "problems", [])]


def cmd_inspect(args: argparse.Namespace) -> int:
    with _open_or_list(args.store) as store:
        summary = _summary(store)
        damaged = _damage(store)
    if args.json:
        print(json.dumps({**summary, "damaged_files": damaged}, indent=2))
        return EXIT_FAILED if damaged else EXIT_OK
    print(f"store:        {summary['store']}")
    print(f"tensors:      {summary['tensors']}")
    print(
        f"bytes:        {format_size(summary['raw_bytes'])} raw, "
        f"{format_size(summary['stored_bytes'])} stored "
        f"(compression ratio {summary['compression_ratio']:.2f})"
    )
    print(f"files:        {summary['files']} ({len(summary['mounts'])} mounted)")
    for mount in summary["mounts"]:
        print(f"  mount:      {mount}")
    for problem in damaged:
        print(f"  damaged:    {problem['path']} {problem['problem']}")
    for dtype, count in sorted(summary["dtypes"].items()):
        print(f"dtype {dtype:<8} {count} tensors, {format_size(summary['dtype_bytes'][dtype])}")
    for codec, count in sorted(summary["codecs"].items()):
        print(f"codec {codec:<8} {count} tensors")
    return EXIT_FAILED if damaged else EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    with _open_or_list(args.store) as store:
        names = [n for n in store if args.pattern is None or fnmatch.fnmatchcase(n, args.pattern)]
        rows = [{"name": name, **store.info(name)} for name in names]
        damaged = {name: p["problem"] for p in _damage(store) for name in p["tensors"]}
    for row in rows:
        row["dtype"] = str(row["dtype"]).removeprefix("torch.")
        row["shape"] = list(row["shape"])
        if row["name"] in damaged:
            row["file_problem"] = damaged[row["name"]]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_rows(rows)
    if not rows and args.pattern is not None:
        print(f"bigmodel: no tensor matches {args.pattern!r}", file=sys.stderr)
    return EXIT_FAILED if damaged or (not rows and args.pattern is not None) else EXIT_OK


def _print_rows(rows: list[dict]) -> None:
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        size = format_size(r["nbytes"])
        flag = "  (file damaged)" if "file_problem" in r else ""
        print(f"{r['name']:<{width}}  {r['dtype']:<14} {shape:<20} {size:>10}  {r['codec']}{flag}")


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        store = checkpoints.open_store(args.store)
    except (StoreError, OSError) as err:  # damaged files; NotAStoreError is bad input (2)
        return _report_unopenable(args, err)
    with store:
        corrupt = store.verify()
        # Only bytes bigmodel wrote have checksums: mounted files (safetensors checkpoints,
        # offload folders) record none, and were checked when mounted (headers, every
        # tensor's bytes inside its file, file sizes).
        mounted = {f["path"] for f in store.files() if f["mounted"]}
        unchecked = sum(1 for name in store if store.info(name)["file"] in mounted)
        count = len(store)
    if args.json:
        report = {"tensors": count, "checksummed": count - unchecked, "corrupt": corrupt}
        print(json.dumps(report, indent=2))
        return EXIT_FAILED if corrupt else EXIT_OK
    checked = count - unchecked
    if corrupt:
        print(f"verification failed: {len(corrupt)} of {checked} tensors fail their checksum:")
        print("\n".join(f"  {name}" for name in corrupt))
    elif checked or not unchecked:
        print(f"all {checked} tensors match their checksums")
    if unchecked:
        print(
            f"no checksums to check for {unchecked} tensors: they are in mounted files "
            "(safetensors files, accelerate offload folders), which record none"
        )
        print(
            "checked instead: the headers, that every tensor's bytes lie inside its file, and "
            "the file sizes: all correct; a damaged data byte cannot be detected this way "
            "(`bigmodel pack` the files into a store to record checksums)"
        )
    return EXIT_FAILED if corrupt else EXIT_OK


def _report_unopenable(args: argparse.Namespace, error: Exception) -> int:
    """verify of a store that cannot be opened: the damaged files, or the error."""
    listing = checkpoints.read_listing(args.store)
    damaged = _damage(listing)
    if args.json:
        report = {"tensors": len(listing) if listing else None, "damaged_files": damaged}
        print(json.dumps({**report, "error": _one_line(error)}, indent=2))
    elif damaged:
        print(f"verification failed: {len(damaged)} damaged file(s):")
        print("\n".join(f"  {problem}" for problem in listing.problems))
        print("the other tensors were not checked: restore these files and verify again")
    else:
        print(f"verification failed: {_one_line(error)}")
    return EXIT_FAILED


def cmd_pack(args: argparse.Namespace) -> int:
    _check_destination(Path(args.dest), args.force)
    started = time.perf_counter()
    with checkpoints.open_source(args.src) as source:
        for note in getattr(source, "notes", []):
            print(f"note: {note}")
        write_store(args.dest, source, codec=args.codec, shard_size=args.shard_size)
    seconds = time.perf_counter() - started
    with TensorStore.open(args.dest) as packed:
        summary = _summary(packed)
    raw, stored = summary["raw_bytes"], summary["stored_bytes"]
    print(f"packed {args.src} into {args.dest}")
    print(f"tensors:      {summary['tensors']} in {summary['files']} file(s)")
    print(
        f"bytes:        {format_size(raw)} raw, {format_size(stored)} stored "
        f"(compression ratio {summary['compression_ratio']:.2f})"
    )
    print(f"time:         {seconds:.2f} s ({format_size(raw / max(seconds, 1e-9))}/s)")
    return EXIT_OK


def _check_destination(dest: Path, force: bool) -> None:
    """Refuses a destination holding a store or other files, unless forced."""
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest}: exists and is not a directory")
    if force or not dest.exists():
        return
    if (dest / _core.INDEX_FILE).exists():
        raise ValueError(f"{dest} already holds a store; pass --force to replace it")
    entries = os.listdir(dest)
    if entries:
        raise ValueError(
            f"{dest} is not empty ({len(entries)} entries); pass --force to write the store "
            "there anyway (the other files are kept)"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigmodel", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("inspect", cmd_inspect, "summarise a store: tensors, bytes, files, dtypes, codecs"),
        ("ls", cmd_ls, "one row per tensor: name, dtype, shape, size, codec"),
        ("verify", cmd_verify, "check every checksum and file (exit 1 on failure)"),
    ):
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("store", help="store directory, safetensors file or offload folder")
        command.add_argument("--json", action="store_true", help="machine-readable output")
        command.set_defaults(func=func)
    sub.choices["ls"].add_argument("--pattern", help="only names matching this glob")
    pack_help = "copy a checkpoint or offload folder into a store (checksums, compression)"
    pack = sub.add_parser("pack", help=pack_help, description=pack_help)
    pack.add_argument(
        "src", help="safetensors file or folder, .bin/.pt checkpoint, offload folder, store"
    )
    pack.add_argument("dest", help="directory of the new store")
    pack.add_argument("--codec", choices=("none", "zstd"), default="none")
    pack.add_argument(
        "--shard-size",
        type=size_option("--shard-size"),
        default="2GB",
        help="most bytes per shard file, e.g. 500MB, 2GiB or 100000000 (default 2GB)",
    )
    pack.add_argument(
        "--force", action="store_true", help="write into DEST even if it holds a store or files"
    )
    pack.set_defaults(func=cmd_pack)
    demo_help = "disk-offloaded inference of a model bigger than its RAM budget"
    demo_parser = sub.add_parser("demo", help=demo_help, description=demo.__doc__)
    demo_parser.formatter_class = argparse.RawDescriptionHelpFormatter
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=demo.run_from_args)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _close_stdout() -> None:
    """After the reader of our output went away (``bigmodel ls X | head -1``): point stdout
    at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is not a file descriptor (an in-process capture)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe fails here, not at exit
        return code
    except KeyboardInterrupt:
        print("bigmodel: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _close_stdout()
        return EXIT_OUTPUT_CLOSED
    except (StoreError, OSError, ValueError, TypeError) as err:
        print(f"bigmodel: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
