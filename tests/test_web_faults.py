"""Issue 19, the page's findings: an unfamiliar row without a familiarity, Unicode digits taken as
catalogue ids, a catalogue read without a time limit, and the model card shown as raw JSON.

No scoring model is needed: the fake scoring server of tests/test_reliability_probe.py stands in."""

from __future__ import annotations

import http.client
import socket
import sqlite3
import threading
import time

import pytest
import requests

from tests.test_model_card import photo_card_facts
from tests.test_reliability_probe import FakeScoring, jpeg, png, row, upload
from web.app import create_app
from web.model_info import ModelInfo


@pytest.fixture(scope="module")
def fake():
    server = FakeScoring()
    yield server
    server.shutdown()
    server.server_close()


def small_catalogue(folder) -> sqlite3.Connection:
    """A SQLite catalogue of one image, 1 -> cat/a.png in `folder`/store."""
    (folder / "store" / "cat").mkdir(parents=True)
    (folder / "store" / "cat" / "a.png").write_bytes(png())
    conn = sqlite3.connect(folder / "c.db")
    conn.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT)")
    conn.execute("INSERT INTO images VALUES (1, 'cat/a.png')")
    conn.commit()
    return conn


@pytest.fixture()
def client_for(fake, tmp_path):
    def make(**config):
        return create_app(
            {"SCORING_URL": f"{fake.url}/invocations", "SCORING_TIMEOUT": 2, "IMAGE_STORE": str(tmp_path / "store"), **config}
        )

    return make


# --- 11: `unfamiliar: true` with `familiarity` null or absent is inside the contract ---------------


@pytest.mark.parametrize("familiarity", ["null", "absent"])
def test_an_unfamiliar_row_without_familiarity_is_answered_on_both_routes(fake, client_for, tmp_path, familiarity):
    answer = row(unfamiliar=True, familiarity=None)
    if familiarity == "absent":
        del answer["predictions"][0]["familiarity"]
    fake.answer(answer)
    client = client_for(ANIMAL_DB=str(tmp_path / "none.db")).test_client()
    api = upload(client, "/api/predict", jpeg())
    assert api.status_code == 200 and api.json["unfamiliar"] is True
    page = upload(client, "/predict", jpeg())
    assert page.status_code == 200, page.get_data(as_text=True)[:300]
    assert b"data-unfamiliar" in page.data and b"its answer is a guess" in page.data
    assert b"familiarity" not in page.data.split(b"data-unfamiliar", 1)[1].split(b"</section>", 1)[0]


def test_an_unfamiliar_row_with_familiarity_still_shows_it(fake, client_for, tmp_path):
    fake.answer(row(unfamiliar=True, familiarity=0.12))
    page = upload(client_for(ANIMAL_DB=str(tmp_path / "none.db")).test_client(), "/predict", jpeg())
    assert page.status_code == 200 and b"data-unfamiliar" in page.data and b"familiarity 0.12" in page.data


# --- 13: ids are ASCII digits; catalogue reads have a time limit ----------------------------------


@pytest.mark.parametrize("path", ["/images/\u0661", "/images/\uff11", "/images/%D9%A1", "/images/%EF%BC%91", "/images/\u0967"])
def test_unicode_digits_are_not_catalogue_ids(client_for, tmp_path, path):
    small_catalogue(tmp_path).close()
    client = client_for(ANIMAL_DB=str(tmp_path / "c.db")).test_client()
    assert client.get("/images/1").status_code == 200  # the same image under its one URL
    assert client.get(path).status_code == 404


def test_a_slow_catalogue_is_cut_at_its_time_limit(client_for, tmp_path):
    """A catalogue whose `images` is a view that takes many seconds to read (the probe's 18 s
    /healthz): with CATALOGUE_TIMEOUT the read is interrupted and both routes say so."""
    conn = small_catalogue(tmp_path)
    conn.execute("ALTER TABLE images RENAME TO real_images")
    conn.execute(
        "CREATE VIEW images AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 300000000) "
        "SELECT r.id AS id, r.path AS path FROM real_images r JOIN n ON n.x = r.id + 300000000"
    )
    conn.commit()
    conn.close()
    client = client_for(ANIMAL_DB=str(tmp_path / "c.db"), CATALOGUE_TIMEOUT=0.5).test_client()
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json["catalogue"] == {"readable": False}
    assert client.get("/images/1").status_code == 503


def test_a_fast_catalogue_is_read_as_before(client_for, tmp_path):
    small_catalogue(tmp_path).close()
    client = client_for(ANIMAL_DB=str(tmp_path / "c.db"), CATALOGUE_TIMEOUT=0.5).test_client()
    assert client.get("/healthz").json["catalogue"] == {"readable": True}
    assert client.get("/images/1").status_code == 200


def test_catalogue_timeout_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="CATALOGUE_TIMEOUT"):
        create_app({"CATALOGUE_TIMEOUT": 0, "ANIMAL_DB": str(tmp_path / "none.db")})


# --- section 3: the model card is a page -----------------------------------------------------------


def card_facts() -> dict:
    facts = photo_card_facts("<script>alert(1)</script>")
    facts["model"].update({"name": "animal", "version": "4", "run_id": "abc123"})
    return facts


def with_card(app, facts: dict | None):
    info = ModelInfo(ttl=float("inf"))
    info._cached = (time.monotonic(), facts, None if facts else "the registry has no model card for animal@production")
    app.extensions["model_info"] = info
    return app.test_client()


def test_the_footer_links_to_the_card_page_and_the_page_shows_it_escaped(tmp_path):
    facts = card_facts()
    client = with_card(create_app({"ANIMAL_DB": str(tmp_path / "none.db")}), facts)
    index = client.get("/").get_data(as_text=True)
    assert 'href="/model">model card</a>' in index and 'href="/api/model"' not in index
    page = client.get("/model")
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    assert "animal version 4" in text and "abc123" in text and "data-card-source>afhq<" in text
    assert "data-card-accuracy>0.9000<" in text
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert all(limit.replace("'", "&#39;") in text for limit in facts["limits"] if "<" not in limit)
    assert 'href="/api/model"' in text  # the JSON stays where it was
    assert client.get("/api/model").json == facts


def test_the_card_page_without_a_card_is_a_503_page(tmp_path):
    client = with_card(create_app({"ANIMAL_DB": str(tmp_path / "none.db")}), None)
    page = client.get("/model")
    assert page.status_code == 503 and page.mimetype == "text/html" and b"model card is not available" in page.data


def test_a_card_with_odd_values_still_renders(tmp_path):
    facts = card_facts()
    facts["validation"]["accuracy"] = "n/a"
    facts["data"]["images"] = "many"
    facts["familiarity"] = {}
    client = with_card(create_app({"ANIMAL_DB": str(tmp_path / "none.db")}), facts)
    page = client.get("/model")
    assert page.status_code == 200 and b"data-card-accuracy>n/a<" in page.data


# --- 12: slow clients under gunicorn.conf.py --------------------------------------------------------


def test_twenty_trickling_clients_leave_the_page_answering(fake, tmp_path):
    """20 clients trickle their headers forever, each holding one gunicorn thread: under 2 workers x
    8 threads they held every thread and nothing else was answered, the stalled upload's 408
    included; 2 x 32 leaves threads free in both workers however the connections are spread."""
    from tests.test_reliability_probe import trickle_headers
    from web.serve import page_server

    fake.answer(row())
    with page_server(fake.url, log=tmp_path / "page.log", UPLOAD_IDLE_TIMEOUT=2, SCORING_TIMEOUT=5) as page:
        port = int(page.url.rsplit(":", 1)[1])
        stop, sent = threading.Event(), [[] for _ in range(20)]
        slow = [threading.Thread(target=trickle_headers, args=(port, stop, s), daemon=True) for s in sent]
        for thread in slow:
            thread.start()
        try:
            time.sleep(2)  # all connected and trickling
            stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
            stalled.sendall(
                b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                b"Content-Type: multipart/form-data; boundary=B\r\n\r\n--B\r\n"
            )
            for _ in range(10):  # a fresh connection each: any worker may take it
                answer = requests.get(f"{page.url}/healthz", timeout=30, headers={"Connection": "close"})
                assert answer.json()["ok"] is True
            assert all(thread.is_alive() for thread in slow) and all(sent)  # still trickling meanwhile
            response = http.client.HTTPResponse(stalled)
            response.begin()  # within the 30 s socket timeout: the page ends it after UPLOAD_IDLE_TIMEOUT
            assert response.status == 408
            stalled.close()
        finally:
            stop.set()
            for thread in slow:
                thread.join(timeout=10)
