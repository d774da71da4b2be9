"""`torchremote worker ...`: run a worker as its own process.

The first line on stdout is the worker's URL (so scripts can read it); logs go to stderr and, with
--log-file, to a file. Ctrl-C or SIGTERM shut it down cleanly.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from .client.handle import connect
from .launch import start_worker
from .wire.errors import TorchRemoteError
from .wire.messages import DEFAULT_MAX_MESSAGE_BYTES
from .wire.resume import DEFAULT_GRACE_S
from .worker import published_files
from .worker.server import describe_bytes


def _read_token(path: str | None, env: bool = True) -> str | None:
    if path:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise SystemExit(f"torchremote: the token file {path} is empty")
        return token
    return os.environ.get("TORCHREMOTE_TOKEN") or None if env else None


def _worker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            print("torchremote: --threads must be at least 1", file=sys.stderr)
            return 1
        torch.set_num_threads(args.threads)
    try:
        # every file is read whole before the worker starts: one bad file, and none is served
        paths = list(args.publish or [])
        for directory in args.data_dir or []:
            paths += published_files.in_directory(directory)
        files = [published_files.read(p) for p in paths]
        mocks = {name: t for p in args.mock or [] for name, t in published_files.read(p).tensors.items()}
        owner_token = _read_token(args.owner_token_file, env=False) if args.owner_token_file else None
        server = start_worker(args.id, args.host, args.port, token=_read_token(args.token_file),
                              owner_token=owner_token,
                              device=args.device, insecure=args.insecure, verbose=args.verbose,
                              log_file=args.log_file, certfile=args.certfile, keyfile=args.keyfile,
                              max_message_bytes=args.max_message_bytes, max_clients=args.max_clients,
                              max_client_bytes=args.max_client_bytes, max_memory=args.max_memory,
                              max_gpu_memory=args.max_gpu_memory, allow_code=args.allow_code,
                              checkpoint_dir=args.checkpoint_dir,
                              resume_grace=args.resume_grace, console_port=args.console_port,
                              console_host=args.console_host, metrics_public=args.metrics_public)
    except (TorchRemoteError, OSError, ValueError) as e:
        print(f"torchremote: cannot start worker: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"torchremote: cannot start worker: the console needs aiohttp and prometheus-client "
              f"(pip install 'torchremote[console]'): {e}", file=sys.stderr)
        return 1
    try:
        published = server.publish_files(files, args.tags or (), args.description, private=args.private,
                                         writable=args.writable, mocks=mocks)
    except Exception as e:  # a device that cannot hold them, say: stop rather than serve half
        server.stop()
        print(f"torchremote: cannot start worker: {e}", file=sys.stderr)
        return 1
    print(server.url, flush=True)
    print(f"torchremote: worker {server.id!r} at {server.url}; memory budget: {server.describe_budget()} "
          f"(--max-memory); each client may hold up to {describe_bytes(server.max_client_bytes)} (--max-client-bytes)"
          + (f"; published {len(published)} tensor(s) from {len(files)} file(s)" if files else ""),
          file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


def _ls(args: argparse.Namespace) -> int:
    try:
        token = (_read_token(args.owner_token_file, env=False) if args.owner_token_file
                 else _read_token(args.token_file))
        with connect(args.url, token=token, name="ls", timeout=args.timeout) as w:
            print(f"worker {w.id!r} at {w.url}")
            print(w.objects())
            print(w.memory())
    except (TorchRemoteError, OSError) as e:
        print(f"torchremote: {e}", file=sys.stderr)
        return 1
    return 0


def _as_owner(args: argparse.Namespace, act) -> int:
    """Connect with the owner token and do `act(worker)` (the release requests commands)."""
    try:
        with connect(args.url, token=_read_token(args.owner_token_file, env=False), name="owner",
                     timeout=args.timeout) as w:
            act(w)
    except (TorchRemoteError, OSError, LookupError) as e:
        print(f"torchremote: {e}", file=sys.stderr)
        return 1
    return 0


def _requests(args: argparse.Namespace) -> int:
    def show(w) -> None:
        rows = [(str(r.id), r.client, r.object, str(list(r.shape)), str(r.dtype).removeprefix("torch."),
                 r.lineage, str(r.steps), r.status + (f" by {r.decided_by}" if r.decided_by else ""),
                 r.reason, r.failure) for r in w.requests()]
        print(_table(("id", "client", "object", "shape", "dtype", "lineage", "steps", "status", "reason",
                      "failed (kept from the client)"), rows))
    return _as_owner(args, show)


def _decide(args: argparse.Namespace) -> int:
    def decide(w) -> None:
        r = w.approve(args.id) if args.command == "approve" else w.deny(args.id, args.reason)
        print(f"release request #{r.id} ({r.object}, {r.lineage}) for {r.client}: {r.status}")
    return _as_owner(args, decide)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines) + ("" if rows else "\n(no release requests)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchremote", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    w = commands.add_parser("worker", help="serve tensors to clients over websockets")
    w.add_argument("--id", default="worker", help="the worker's name, shown to clients (default: worker)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    w.add_argument("--port", type=int, default=3000, help="port to listen on; 0 picks a free one")
    w.add_argument("--token-file", help="file holding the shared token clients must present "
                                        "(default: $TORCHREMOTE_TOKEN)")
    w.add_argument("--certfile", help="serve wss:// (TLS) with this certificate chain (PEM)")
    w.add_argument("--keyfile", help="the certificate's private key, if not in --certfile")
    w.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest message a client may send (default: %(default)s)")
    w.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="the memory budget of the whole worker: bytes, 512MiB, 8GiB or 80%% of this machine's; "
                        "0 for no limit (default: 80%%)")
    w.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                   help="on a CUDA worker, the budget of device memory, as --max-memory (default: 80%% of the device)")
    w.add_argument("--max-client-bytes", default=None, metavar="SIZE",
                   help="most memory one client may hold, as --max-memory (a share: of the budget); "
                        "0 for no limit (default: half of the budget)")
    w.add_argument("--max-clients", type=int, default=None,
                   help="most clients served at once; past it, new ones are refused (default: no limit)")
    w.add_argument("--resume-grace", type=float, default=DEFAULT_GRACE_S, metavar="SECONDS",
                   help="how long the objects of a client whose connection dropped are kept for it to "
                        "reconnect and resume; 0: freed at once (default: %(default)g)")
    w.add_argument("--publish", action="append", metavar="FILE.safetensors",
                   help="publish every tensor in this safetensors file under its name (repeatable)")
    w.add_argument("--data-dir", action="append", metavar="DIR",
                   help="publish every .safetensors file in DIR at start (repeatable)")
    w.add_argument("--checkpoint-dir", metavar="DIR",
                   help="clients may save checkpoints here, on this machine (tr.save_on_worker), and load them back")
    w.add_argument("--mock", action="append", metavar="FILE.safetensors",
                   help="mocks of published tensors, by name: made-up data of the same shape and dtype that "
                        "any client may fetch (x.mock()) to develop on (repeatable)")
    w.add_argument("--console-port", type=int, default=None, metavar="PORT",
                   help="serve the owner's console (a web page, and /metrics) on this port; 0 picks a free one. "
                        "A one-time sign-in link is printed at start (default: off)")
    w.add_argument("--console-host", default="127.0.0.1",
                   help="address the console listens on (default: 127.0.0.1)")
    w.add_argument("--metrics-public", action="store_true",
                   help="serve /metrics without signing in (a loopback console host only)")
    w.add_argument("--tags", nargs="+", metavar="T", help="tags added to every tensor published from files")
    w.add_argument("--private", action="store_true",
                   help="clients may compute on the tensors published from files, never fetch them")
    w.add_argument("--writable", action="store_true",
                   help="clients may change the tensors published from files in place (default: read-only)")
    w.add_argument("--description", help="description of the tensors published from files "
                                          "(default: the file's own metadata)")
    w.add_argument("--device", default="cpu", help="where the worker keeps tensors (default: cpu)")
    w.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (default: torch's choice, one per core). On a machine "
                        "shared with its client, fewer leaves the client a core")
    w.add_argument("--log-file", help="also write the log to this file")
    w.add_argument("--verbose", action="store_true", help="log every command with the peer's address")
    w.add_argument("--allow-code", action="store_true",
                   help="let authenticated clients run their own functions here (worker.run, "
                        "@torchremote.remote): they are unpickled with cloudpickle; needs a token")
    w.add_argument("--insecure", action="store_true",
                   help="allow listening on a non-loopback address without a token")
    w.add_argument("--owner-token-file", help="file holding the owner's token, which lists, approves and "
                                              "denies release requests (`torchremote requests/approve/deny`)")
    w.set_defaults(run=_worker)
    ls = commands.add_parser("ls", help="print a worker's registry (published data, with tags) and its memory")
    ls.add_argument("url", help="the worker's URL, ws://HOST:PORT or wss://...")
    ls.add_argument("--token-file", help="file holding the worker's token (default: $TORCHREMOTE_TOKEN)")
    ls.add_argument("--owner-token-file", help="the owner token instead: memory is listed for every client")
    ls.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the worker")
    ls.set_defaults(run=_ls)
    for name, what in (("requests", "list a worker's release requests"), ("approve", "approve a release request"),
                       ("deny", "deny a release request")):
        c = commands.add_parser(name, help=f"{what} (the owner token)")
        c.add_argument("url", help="the worker's URL, ws://HOST:PORT or wss://...")
        if name != "requests":
            c.add_argument("id", type=int, help="the request's number")
        if name == "deny":
            c.add_argument("--reason", default="", help="told to the client")
        c.add_argument("--owner-token-file", required=True, help="file holding the worker's owner token")
        c.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the worker")
        c.set_defaults(run=_requests if name == "requests" else _decide)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
