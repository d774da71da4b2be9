"""The console's HTML, rendered on the server. Every string that a client or a file chose (names,
reasons, tags, lineage, descriptions, log lines) goes through `esc`; no page carries inline script
or style, so the Content-Security-Policy can forbid both.
"""
from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING, Iterable

import torch

from ..budget import describe

if TYPE_CHECKING:
    from ..releases import ReleaseRequest
    from ..server import ClientStatus, WorkerServer

PAGES = (("overview", "/", "Overview"), ("data", "/data", "Data"), ("clients", "/clients", "Clients"),
         ("requests", "/requests", "Requests"), ("log", "/log", "Log"))


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(worker_id: str, current: str, body: str, csrf: str) -> str:
    """A whole page: the header, the navigation, and `body` in the part the script refreshes."""
    current_mark = ' class="current"'
    nav = "".join(f'<a href="{href}"{current_mark if name == current else ""}>{esc(title)}</a>'
                  for name, href, title in PAGES)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(worker_id)}: torchremote console</title>'
            f'<link rel="stylesheet" href="/static/console.css"><script src="/static/console.js" defer></script>'
            f'</head><body><header><strong>torchremote</strong> <span class="worker">{esc(worker_id)}</span>'
            f'<nav>{nav}</nav><form method="post" action="/logout" class="signout">'
            f'<input type="hidden" name="csrf" value="{esc(csrf)}"><button type="submit">Sign out</button></form>'
            f'</header><main id="live" data-fragment="/fragment/{esc(current)}">{body}</main></body></html>')


def sign_in_page(message: str = "") -> str:
    note = f'<p class="error">{esc(message)}</p>' if message else ""
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in: torchremote console</title>'
            '<link rel="stylesheet" href="/static/console.css"></head><body><main class="signin">'
            f'<h1>torchremote console</h1>{note}<p>Open the sign-in link the worker printed, or give the owner '
            'token.</p><form method="post" action="/login"><label>Owner token <input type="password" '
            'name="token" autocomplete="off" autofocus></label> <button type="submit">Sign in</button></form>'
            '</main></body></html>')


def table(header: Iterable[str], rows: Iterable[Iterable[str]], empty: str, cls: str = "") -> str:
    """Cells are HTML already (escape before)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{esc(empty)}</p>'
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def when(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if d or h else "") + f"{m}m {s}s"


def dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def overview(server: "WorkerServer", ops_per_s: float) -> str:
    clients = server.clients()
    traffic = server.traffic()
    pending = sum(r.status == "pending" for r in server.requests())
    memory = table(("pool", "in use", "limit"),
                   ((esc(name), esc(describe(used)), esc(describe(limit)) if limit else "no limit")
                    for name, used, limit in server.budget.rows()), "no memory pools")
    facts = [("worker", server.id), ("clients connect to", server.url), ("device", server.device),
             ("up for", duration(time.time() - server.started_at)),
             ("clients", f"{sum(not c.parked for c in clients)} connected, {sum(c.parked for c in clients)} parked"),
             ("ops per second", f"{ops_per_s:,.0f}"), ("ops run", f"{traffic.ops:,}"),
             ("received / sent", f"{describe(traffic.bytes_in)} / {describe(traffic.bytes_out)}"),
             ("each client may hold", describe(server.max_client_bytes) if server.max_client_bytes else "no limit"),
             ("release requests pending", pending)]
    rows = "".join(f'<tr><th>{esc(k)}</th><td data-fact="{esc(k)}">{esc(v)}</td></tr>' for k, v in facts)
    return f'<h1>Overview</h1><table class="facts"><tbody>{rows}</tbody></table><h2>Memory</h2>{memory}'


def data(server: "WorkerServer") -> str:
    rows = []
    for oid, p in server.store.published_rows():
        rows.append((esc(oid), " ".join(f'<span class="tag">{esc(t)}</span>' for t in p.tags),
                     esc(list(p.tensor.shape)), esc(dtype(p.tensor.dtype)), "private" if not p.allow_get else "open",
                     "writable" if p.writable else "read-only", "yes" if p.mock is not None else "no",
                     esc(p.description)))
    return "<h1>Published data</h1>" + table(
        ("id", "tags", "shape", "dtype", "access", "clients may", "mock", "description"), rows,
        "Nothing is published.", "data")


def clients(server: "WorkerServer") -> str:
    now = time.time()
    rows = [(esc(c.id) + (' <span class="badge">owner</span>' if c.owner else ""), esc(c.peer),
             esc(when(c.connected_at)) + f' <span class="muted">({esc(duration(now - c.connected_at))})</span>',
             esc(c.objects), esc(describe(c.held_bytes)), esc(f"{c.ops:,}"),
             esc(f"{describe(c.bytes_in)} / {describe(c.bytes_out)}"),
             f"parked {esc(duration(c.parked_for_s))}, kept for a resume" if c.parked else "connected")
            for c in sorted(server.clients(), key=lambda c: c.connected_at)]
    return "<h1>Clients</h1>" + table(
        ("client", "peer", "connected since", "objects", "holding", "ops run", "received / sent", "state"), rows,
        "No client is connected.", "clients")


def requests(server: "WorkerServer", csrf: str) -> str:
    all_requests = server.requests()
    pending = [r for r in all_requests if r.status == "pending"]
    decided = sorted((r for r in all_requests if r.status != "pending"),
                     key=lambda r: r.decided_at or r.filed_at, reverse=True)
    head = ("#", "client", "object", "shape", "dtype", "numel", "lineage", "backward steps", "reason")
    open_rows = [(*_request_cells(r), _decision_forms(r, csrf)) for r in pending]
    done_rows = [(*_request_cells(r), esc(r.status), esc(r.decided_by), esc(when(r.decided_at)), esc(r.note))
                 for r in decided]
    rules = server.releases.rules()
    rules_html = ("<ul>" + "".join(f"<li><code>{esc(name)}</code>{': ' + esc(doc) if doc else ''}</li>"
                                   for name, doc in rules) + "</ul>") if rules else \
        '<p class="empty">No auto_approve rule: every request waits for you.</p>'
    return (f'<h1>Release requests</h1><h2>Pending ({len(pending)})</h2>'
            + table((*head, "failed op (kept from the client)", "decide"), open_rows, "Nothing waits for you.",
                    "requests pending")
            + f'<h2>Decided ({len(decided)})</h2>'
            + table((*head, "failed op (kept from the client)", "status", "by", "when", "note"), done_rows,
                    "No request has been decided.", "requests decided")
            + f'<h2>Rules in force</h2>{rules_html}')


def _request_cells(r: "ReleaseRequest") -> tuple[str, ...]:
    return (esc(r.id), esc(r.client), esc(r.object), esc(list(r.shape)), esc(dtype(r.dtype)), esc(f"{r.numel:,}"),
            f"<code>{esc(r.lineage)}</code>", esc(r.steps), f'<span class="reason">{esc(r.reason)}</span>',
            esc(r.failure))


def _decision_forms(r: "ReleaseRequest", csrf: str) -> str:
    token = f'<input type="hidden" name="csrf" value="{esc(csrf)}">'
    return (f'<form method="post" action="/requests/{r.id}/approve" class="decide">{token}'
            f'<button type="submit" class="approve" id="approve-{r.id}">Approve</button></form>'
            f'<form method="post" action="/requests/{r.id}/deny" class="decide">{token}'
            f'<input type="text" name="reason" placeholder="reason, told to the client" id="reason-{r.id}">'
            f'<button type="submit" class="deny" id="deny-{r.id}">Deny</button></form>')


def log(lines: list[tuple[float, str, str]]) -> str:
    rows = "".join(f'<div class="line {esc(level.lower())}"><span class="time">{esc(when(t))}</span> '
                   f'<span class="level">{esc(level)}</span> {esc(text)}</div>' for t, level, text in lines)
    rows = rows or '<p class="empty">Nothing logged yet.</p>'
    return f'<h1>Log</h1><div class="log">{rows}</div>'
