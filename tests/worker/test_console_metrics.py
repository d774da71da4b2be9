"""The console's HTTP side without a browser: /metrics (who may read it, what moves), TLS, and
what the worker does without a console."""
from __future__ import annotations

import http.cookiejar
import ssl
import urllib.error
import urllib.request

import pytest
import torch
import trustme
from prometheus_client.parser import text_string_to_metric_families

import torchremote as tr
from torchremote.wire.errors import WorkerPermissionError

from conftest import wait_until

OWNER, CLIENT = "owner-token-for-tests", "client-token-for-tests"


@pytest.fixture
def console():
    server = tr.start_worker(id="metered", token=CLIENT, owner_token=OWNER, console_port=0)
    server.publish(torch.arange(4.), tags=["#private"], private=True)
    yield server
    server.stop()


def scrape(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers=headers), timeout=10,
                                context=context) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            key = s.name + (f"{{{labels}}}" if labels else "")
            if "le" not in s.labels:
                samples[key] = s.value
    return samples


def status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_metrics_need_the_owner_and_move_with_traffic(console):
    url = console.console_url
    assert status(url + "/metrics") == 401
    assert status(url + "/metrics", {"Authorization": f"Bearer {CLIENT}"}) == 401  # a client token is no owner's
    before = scrape(url, OWNER)
    assert before["torchremote_clients{state=connected}"] == 0
    with tr.connect(console.url, token=CLIENT) as w:
        x = torch.ones(1000).send(w)
        for _ in range(50):
            x = x + 1
        assert x.sum().item() == 51_000
        (w.search("#private")[0] * 2).request(reason="metrics")
        during = scrape(url, OWNER)
        assert during["torchremote_clients{state=connected}"] == 1
        assert during["torchremote_objects{holder=clients}"] >= 1
        assert during["torchremote_objects{holder=published}"] == 1
        assert during["torchremote_release_requests{status=pending}"] == 1
    # the worker ends the session once it sees the close: the ended session's counts stay in the totals
    assert wait_until(lambda: scrape(url, OWNER)["torchremote_clients{state=connected}"] == 0)
    after = scrape(url, OWNER)
    assert after["torchremote_ops_total"] - before["torchremote_ops_total"] >= 51
    assert after["torchremote_bytes_total{direction=in}"] - before["torchremote_bytes_total{direction=in}"] > 4000
    assert after["torchremote_bytes_total{direction=out}"] > before["torchremote_bytes_total{direction=out}"]
    assert after["torchremote_op_seconds_count"] >= 51 and after["torchremote_op_seconds_sum"] > 0
    assert after["torchremote_sync_seconds_count"] >= 2  # the item() and the request, at least
    assert after["torchremote_memory_limit_bytes{pool=memory}"] > 0


def test_failed_sign_ins_are_counted(console):
    before = scrape(console.console_url, OWNER)["torchremote_console_failed_sign_ins_total"]
    assert status(console.console_url + "/login?token=nope") == 403
    assert scrape(console.console_url, OWNER)["torchremote_console_failed_sign_ins_total"] == before + 1


def test_public_metrics_only_on_loopback():
    with tr.start_worker(console_port=0, metrics_public=True) as server:
        assert "torchremote_ops_total" in scrape(server.console_url)
        assert status(server.console_url + "/") == 200 and status(server.console_url + "/fragment/log") == 401
    with pytest.raises(WorkerPermissionError, match="metrics-public"):
        tr.start_worker(console_port=0, console_host="0.0.0.0", metrics_public=True, token="t")


def test_the_console_speaks_tls_when_the_worker_does(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    pem = tmp_path / "worker.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    with tr.start_worker(certfile=str(pem), owner_token=OWNER, console_port=0) as server:
        assert server.console_url.startswith("https://127.0.0.1:")
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar),
                                              urllib.request.HTTPSHandler(context=trusting))
        with browser.open(server.console.login_link(), timeout=10) as r:
            assert r.status == 200 and r.url == server.console_url + "/"
        cookie, = jar
        assert cookie.secure and cookie.has_nonstandard_attr("HttpOnly")
        assert "torchremote_ops_total" in scrape(server.console_url, OWNER, trusting)
        plain = server.console_url.replace("https://", "http://")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(plain + "/login", timeout=10)


def test_no_console_by_default(fresh_server):
    assert fresh_server.console_url is None
    with tr.connect(fresh_server.url) as w:
        (torch.ones(3).send(w) + 1).get()
        session = fresh_server._clients[w.client_id].session
        assert not session.traffic.timed and session.traffic.ops == 1  # counted, never timed
