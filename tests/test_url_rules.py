"""Stage 1 fetches only public http(s) hosts, checked at every hop and connected to as checked.

No packet leaves loopback here: the `loopback_only` guard fails a test that so much as tries to connect
anywhere else, and the only names resolved are `localhost` and a name this file answers itself.
"""
from __future__ import annotations

import socket
from urllib.parse import quote

import pytest

from common.data.download import FetchPolicy, address_refused, fetch
from common.demo.imageserver import ImageServer
from conftest import load_stage, small_jpeg, stage_options, write_csv_rows

POLICY = dict(timeout_s=2, retries=0, backoff_s=0.01)


@pytest.fixture
def loopback_only(monkeypatch):
    """Every connect() in this process is recorded; one to a non-loopback address fails the test before it is
    made."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        attempts.append(address[0])
        if not (address[0].startswith("127.") or address[0] == "::1"):
            pytest.fail(f"a connection to {address} was attempted")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture
def server(tmp_path):
    small_jpeg(tmp_path / "img" / "a.jpg")
    with ImageServer(tmp_path / "img") as srv:
        yield srv


@pytest.mark.parametrize("address, refused, refused_even_if_allowed", [
    ("169.254.169.254", True, True),      # the cloud metadata service
    ("fe80::1", True, True),              # IPv6 link-local
    ("::ffff:169.254.169.254", True, True),
    ("10.0.0.1", True, False),
    ("192.168.1.1", True, False),
    ("172.16.5.4", True, False),
    ("127.0.0.1", True, False),
    ("::1", True, False),
    ("224.0.0.1", True, False),           # multicast
    ("240.0.0.1", True, False),           # reserved
    ("0.0.0.0", True, False),
    ("100.64.0.1", True, False),          # carrier-grade NAT
    ("93.184.215.14", False, False),      # public
    ("2606:4700::1111", False, False),
])
def test_address_rules(address, refused, refused_even_if_allowed):
    assert address_refused(address) is refused
    assert address_refused(address, allow_private_hosts=True) is refused_even_if_allowed


def test_localhost_is_refused_unless_private_hosts_are_allowed(server, loopback_only):
    url = f"http://localhost:{server.port}/img/a.jpg"
    assert fetch(url, FetchPolicy(**POLICY)).status == "blocked_host"
    assert server.hits["/img/a.jpg"] == 0 and loopback_only == []  # refused before any connection
    assert fetch(url, FetchPolicy(**POLICY, allow_private_hosts=True)).status == "ok"
    assert server.hits["/img/a.jpg"] == 1


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.jpg", "gopher://127.0.0.1:70/",
                                 "http:///a.jpg", "http://127.0.0.1:99999/a.jpg", "//127.0.0.1/a.jpg"])
def test_other_schemes_and_broken_urls_are_bad_urls(url, loopback_only):
    assert fetch(url, FetchPolicy(**POLICY, allow_private_hosts=True)).status == "bad_url"
    assert loopback_only == []


def test_a_redirect_is_checked_at_every_hop(server, loopback_only):
    policy = FetchPolicy(**POLICY, allow_private_hosts=True)
    inside = quote("http://169.254.169.254/latest/meta-data/", safe="")
    assert fetch(server.url(f"/fault/moved/{inside}"), policy).status == "blocked_host"
    assert set(loopback_only) == {"127.0.0.1"}  # only the first hop was connected to
    fine = quote(f"http://localhost:{server.port}/img/a.jpg", safe="")
    assert fetch(server.url(f"/fault/moved/{fine}"), policy).status == "ok"


def test_the_connection_goes_to_the_address_that_was_checked(server, loopback_only, monkeypatch):
    """A name that answers a safe address first and the metadata address after (DNS rebinding): one lookup per
    hop, and the connection goes to the address that lookup gave."""
    real = socket.getaddrinfo
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "shop.example":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) == 1 else "169.254.169.254"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    res = fetch(f"http://shop.example:{server.port}/img/a.jpg", FetchPolicy(**POLICY, allow_private_hosts=True))
    assert res.status == "ok" and lookups == ["shop.example"] and set(loopback_only) == {"127.0.0.1"}


def test_stage1_records_blocked_rows_and_checks_every_csv_first(tmp_path, server, loopback_only):
    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    rows = [{"sample_id": "meta", "catalog_content": "x", "image_link": "http://169.254.169.254/latest/meta-data/",
             "price": "1.00"},
            {"sample_id": "file", "catalog_content": "x", "image_link": "file:///etc/passwd", "price": "1.00"},
            {"sample_id": "local", "catalog_content": "x", "image_link": server.url("/img/a.jpg"), "price": "1.00"}]
    write_csv_rows(data / "train.csv", rows)
    write_csv_rows(data / "test.csv", [{"sample_id": "t1", "catalog_content": "x", "image_link": ""},
                                       {"sample_id": "t1", "catalog_content": "y", "image_link": ""}])
    stage = load_stage("1_download")
    from common.data.catalog import CatalogError
    with pytest.raises(CatalogError, match="duplicate_sample_id"):
        stage.main(stage_options("1_download", data_dir=data, work_dir=work, **POLICY))
    assert not server.hits and not (work / "images").exists()  # the bad test.csv stopped it before any download
    stats = stage.main(stage_options("1_download", data_dir=data, work_dir=work, split="train", **POLICY))["train"]
    assert stats["status_counts"] == {"blocked_host": 2, "bad_url": 1}
    stats = stage.main(stage_options("1_download", data_dir=data, work_dir=tmp_path / "work2", split="train",
                                     allow_private_hosts=True, **POLICY))["train"]
    assert stats["status_counts"] == {"blocked_host": 1, "bad_url": 1, "ok": 1}
    assert set(loopback_only) == {"127.0.0.1"}
