"""The owner's console in a real browser: headless Chromium driven by Playwright.

Each test runs a worker with its console on a free loopback port and a client of its own; the
browser signs in as the owner would, with the link the worker printed.
"""
from __future__ import annotations

import http.server
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from playwright.sync_api import expect, sync_playwright

import torchremote as tr
from conftest import ROOT, wait_until

OWNER, CLIENT = "owner-token-for-tests", "client-token-for-tests"
SCREENSHOTS = ROOT / "docs" / "console"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# the flags this machine's closed network needs: no background connections, no first-run work
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on this machine: `make test` installs it (apt-get install chromium)")
        pytest.skip("no chromium here (make test installs it where it runs as root)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def console():
    """A worker with its console, publishing a private tensor (with a tag that is markup) and its mock."""
    server = tr.start_worker(id="bob", token=CLIENT, owner_token=OWNER, console_port=0)
    server.publish(torch.tensor([52_000., 61_000., 58_500., 70_250.]), tags=["#salaries", "<script>alert(1)</script>"],
                   description="staff salaries <b>(private)</b>", private=True, mock=torch.full((4,), 50_000.))
    server.publish(torch.arange(3.), tags=["#open"], description="open data")
    yield server
    server.stop()


@pytest.fixture
def page(browser, console):
    context = browser.new_context()
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    response = pg.goto(console.console.login_link())
    assert response.status == 200 and pg.url == console.console_url + "/"
    yield pg
    context.close()


def client(console, name="alice"):
    return tr.connect(console.url, token=CLIENT, name=name)


def shot(pg, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_the_sign_in_link_opens_a_session_once_with_a_strict_httponly_cookie(browser, console, page):
    assert page.locator("header .worker").inner_text() == "bob"
    assert "1 connected" not in page.locator("main").inner_text()  # the browser is no client
    cookie, = page.context.cookies()
    assert cookie["name"] == "torchremote_console" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script sees it
    with client(console):
        expect(page.locator("[data-fact=clients]")).to_contain_text("1 connected", timeout=3000)
    shot(page, "overview")

    link = console.console.login_link()
    other = browser.new_context()
    try:
        first = other.new_page()
        assert first.goto(link).status == 200
        again = browser.new_context().new_page()
        response = again.goto(link)  # the same link a second time: used up
        assert response.status == 403 and "wrong, used or expired" in again.content()
        assert again.context.cookies() == []
        again.context.close()
    finally:
        other.close()
    assert page.goto(console.console_url + "/").status == 200  # the first session still stands


def test_wrong_tokens_and_client_tokens_are_refused_and_logged(browser, console):
    owner = browser.new_context().new_page()
    try:  # the owner token signs in through the form
        owner.goto(console.console_url + "/login")
        shot(owner, "sign-in")
        owner.fill("input[name=token]", OWNER)
        owner.click("button[type=submit]")
        owner.wait_for_url(console.console_url + "/")
        assert owner.locator("header .worker").inner_text() == "bob"
    finally:
        owner.context.close()

    pg = browser.new_context().new_page()
    try:
        assert pg.goto(console.console_url + "/").url == console.console_url + "/login"  # not signed in
        for token, said in (("not-the-token", "wrong, used or expired"), (CLIENT, "a client token cannot sign in")):
            pg.fill("input[name=token]", token)
            with pg.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST") as answer:
                pg.click("button[type=submit]")
            assert answer.value.status == 403
            assert said in pg.locator(".error").inner_text()
            assert pg.context.cookies() == []
        lines = [line for _, level, line in console.console.recent.lines() if level == "WARNING"]
        assert sum("refused a sign-in from 127.0.0.1" in line for line in lines) == 2
        assert any("a client token cannot sign in" in line for line in lines)

        for _ in range(3):  # five failures within a minute: then even a good link waits
            assert pg.goto(console.console_url + "/login?token=guess").status == 403
        response = pg.goto(console.console.login_link())
        assert response.status == 429 and "too many failed sign-ins" in pg.content()
        assert pg.context.cookies() == []
    finally:
        pg.context.close()


def test_a_request_shows_within_a_second_and_approve_releases_its_value(console, page):
    page.goto(console.console_url + "/requests")
    with client(console) as alice:
        x = alice.search("#salaries")[0]
        mean = x.mean()
        started = time.monotonic()
        mean.request(reason="for my report")
        row = page.locator("table.pending tbody tr").first
        row.wait_for(timeout=1000)  # the page is refreshed live, without a reload
        seen = time.monotonic() - started
        assert seen < 1.0
        text = row.inner_text()
        assert "mean(#salaries)" in text and "for my report" in text and "alice#" in text and "float32" in text
        shot(page, "requests")

        got = {}
        getter = threading.Thread(target=lambda: got.setdefault("value", mean.get(timeout=30)))
        getter.start()
        page.click("table.pending button.approve")
        getter.join(timeout=35)
        assert not getter.is_alive()
        assert torch.equal(got["value"], torch.tensor(60437.5))
        page.wait_for_url(console.console_url + "/requests")
        decided = page.locator("table.decided tbody tr").first
        expect(decided).to_contain_text("released", timeout=2000)  # the client has had it: live on the page
        assert "owner (console, sign-in link)" in decided.inner_text()
        request, = console.requests()
        assert request.decided_by == "owner (console, sign-in link)" and request.decided_at is not None


def test_deny_with_a_reason_reaches_the_client(console, page):
    page.goto(console.console_url + "/requests")
    with client(console) as alice:
        total = alice.search("#salaries")[0].sum()
        total.request(reason="a total, please")
        page.locator("table.pending tbody tr").first.wait_for(timeout=2000)
        outcome = {}

        def get():
            try:
                total.get(timeout=30)
            except PermissionError as e:
                outcome["error"] = str(e)

        getter = threading.Thread(target=get)
        getter.start()
        page.fill("table.pending input[name=reason]", "too few people: a total would identify them")
        time.sleep(0.7)  # a refresh while the owner types keeps what he typed
        assert page.input_value("table.pending input[name=reason]").startswith("too few people")
        page.click("table.pending button.deny")
        getter.join(timeout=35)
        assert "too few people: a total would identify them" in outcome["error"]
        assert console.requests()[0].status == "denied"


def test_client_strings_render_as_text_never_as_markup(console, page):
    xss = '<img src=x onerror="document.title=\'pwned\'">'
    with client(console, name="<script>alert(2)</script>") as mallory:
        x = mallory.search("#salaries")[0]
        (x * 2).request(reason=xss)
        for name in ("requests", "data", "clients", "log"):
            page.goto(f"{console.console_url}/{name}")
            time.sleep(1.2)  # two refreshes of the live part
            assert page.title() == "bob: torchremote console"
            assert page.dialogs == []
            assert page.locator("main img").count() == 0 and page.locator("main script").count() == 0
        page.goto(console.console_url + "/requests")
        page.locator("table.pending tbody tr").first.wait_for()
        assert xss in page.locator("table.pending .reason").inner_text()
        page.goto(console.console_url + "/data")
        assert "<script>alert(1)</script>" in page.locator("table.data").inner_text()
        assert "staff salaries <b>(private)</b>" in page.locator("table.data").inner_text()
        shot(page, "data")
        page.goto(console.console_url + "/clients")
        page.locator("table.clients tbody tr").first.wait_for()
        assert "_script_alert_2___script_" in page.locator("table.clients").inner_text()  # names are made printable
        shot(page, "clients")
        page.goto(console.console_url + "/log")
        assert "connected as" in page.locator(".log").inner_text()
        shot(page, "log")
        assert page.title() == "bob: torchremote console" and page.dialogs == []


def test_a_form_on_another_origin_approves_nothing(console, page):
    """A page served from another local port (same site, so the SameSite cookie goes with it) posts
    an approval: refused, for its origin; a post with the cookie but without the CSRF token too."""
    with client(console) as alice:
        leak = alice.search("#salaries")[0].max()
        request_id = leak.request(reason="innocent").id
        target = f"{console.console_url}/requests/{request_id}/approve"

        class Attacker(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = (f'<html><body><form id="f" method="post" action="{target}">'
                        f'<input name="csrf" value="guessed"></form>'
                        f'<script>document.getElementById("f").submit()</script></body></html>').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        try:
            with page.expect_response(target) as answer:
                page.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
            assert answer.value.status == 403
        finally:
            evil.shutdown()
            evil.server_close()
        assert console.requests()[0].status == "pending"
        assert any("refused a POST" in line and "from another origin" in line
                   for _, _, line in console.console.recent.lines())

        cookie = page.context.cookies()[0]["value"]
        forged = urllib.request.Request(target, data=b"csrf=guessed", method="POST",
                                        headers={"Cookie": f"torchremote_console={cookie}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged, timeout=10)
        assert refused.value.code == 403
        assert console.requests()[0].status == "pending"
        with pytest.raises(tr.ApprovalRequired):
            leak.get()


def test_every_response_carries_the_security_headers(console, page):
    response = page.goto(console.console_url + "/requests")
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.content().split("</head>")[1]  # no inline script anywhere
    cookie = page.context.cookies()[0]["value"]
    as_get = urllib.request.Request(console.console_url + "/requests/1/approve",
                                    headers={"Cookie": f"torchremote_console={cookie}"})
    with pytest.raises(urllib.error.HTTPError) as refused:  # a decision is a POST, never a link
        urllib.request.urlopen(as_get, timeout=10)
    assert refused.value.code == 405
    rebinding = urllib.request.Request(console.console_url + "/login", headers={"Host": f"evil.example:{console.console.port}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(rebinding, timeout=10)
    assert refused.value.code == 403


def test_sign_out_ends_the_session(console, page):
    page.click("form.signout button")
    page.wait_for_url(console.console_url + "/login")
    assert page.goto(console.console_url + "/requests").url == console.console_url + "/login"
