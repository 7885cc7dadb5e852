"""The dashboard (SPEC §10) in a real headless browser: Debian's Chromium driven by selenium
through Debian's chromedriver (both given by path: selenium-manager never runs, nothing is
downloaded), against the real service on real Kafka and Redis.

Every test ends by checking that the browser logged no console error and that no request
left for another origin. The run saves screenshots of the jobs table, a job page and the
editor's problems in a temporary folder; ``RESTCONSUMER_SCREENSHOTS=docs/screenshots`` makes
it refresh the README's (a test run leaves the working tree as it found it).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.kafka import KafkaBroker
from tests.infra.kafka_io import produce
from tests.infra.ports import wait_for
from tests.infra.service import ADMIN_TOKEN, REPO, ServiceProcess
from tests.infra.sink import Received, Sink

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = Path(os.environ.get("RESTCONSUMER_SCREENSHOTS")
             or Path(tempfile.gettempdir()) / "restconsumer-screenshots")

# Never skipped: without the browser these tests fail, saying what to install.
assert CHROMIUM.exists() and CHROMEDRIVER.exists(), \
    "the dashboard tests need Debian's chromium and chromium-driver (tests/run.sh installs them)"

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

Start = Callable[..., ServiceProcess]


def job(name: str, owner: str, topic: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"id": name, "owner": owner, "type": "POST", "topic": topic,
            "datamap": {"id": "$.msg.id", "name": "$.msg.name"},
            "url": f"{url}/{name}/{{id}}", "json_body": ["id", "name"], **extra}


class Browser:
    """One headless Chromium session on the service's dashboard, and what it logged."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.base = ""
        self.console: list[dict[str, Any]] = []
        self.requests: list[str] = []
        #: Failed answers the test provokes on purpose: (status, path) pairs.
        self.expected_failures: set[tuple[int, str]] = set()

    def open(self, service: ServiceProcess, path: str) -> None:
        self.base = service.url
        self.driver.get(f"{service.url}{path}")

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.find(css).text

    def until(self, check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        """Wait for ``check`` to be truthy (a stale element counts as not yet)."""
        def guarded() -> Any:
            try:
                return check()
            except StaleElementReferenceException:
                return None
        return wait_for(guarded, timeout, what, every=0.2)

    def rows(self) -> dict[str, list[str]]:
        """The jobs table: job id → the texts of its cells."""
        found = {}
        for row in self.finds("#jobs-table tbody tr"):
            cells = row.find_elements(By.CSS_SELECTOR, "th, td")
            found[cells[0].text] = [c.text for c in cells]
        return found

    def type_into(self, css: str, text: str) -> None:
        """Replace a field's text by typing it, as a person would."""
        field = self.find(css)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        field.send_keys(text)

    def press(self, css: str) -> None:
        """Activate a control from the keyboard: focus it, then Enter."""
        element = self.find(css)
        self.driver.execute_script("arguments[0].focus()", element)
        assert self.driver.switch_to.active_element == element
        element.send_keys(Keys.ENTER)

    def screenshot(self, name: str, height: int | None = None) -> Path:
        """Save a screenshot in the screenshots folder (the whole page up to ``height``)."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        size = self.driver.get_window_size()
        if height:
            self.driver.set_window_size(size["width"], height)
            time.sleep(0.3)
        path = SHOTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        if height:
            self.driver.set_window_size(size["width"], size["height"])
        return path

    def collect(self) -> None:
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])
        self.requests += self.driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")

    def assert_clean(self) -> None:
        """No console error (but the failed answers the test asked for), no other origin."""
        self.collect()
        errors = []
        for entry in self.console:
            if entry["level"] != "SEVERE":
                continue
            expected = entry["source"] == "network" and any(
                entry["message"].startswith(f"{self.base}{path}") and f"status of {status} " in
                entry["message"] for status, path in self.expected_failures)
            if not expected:
                errors.append(entry)
        assert errors == [], f"console errors: {errors}"
        foreign = [u for u in self.requests if not (u.startswith(f"{self.base}/") or u.startswith("data:"))]
        assert self.base and self.requests, "no request seen at all"
        assert foreign == [], f"requests to another origin: {foreign}"


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    """Headless Chromium, through the system chromedriver given by path."""
    from selenium.webdriver.common import selenium_manager

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("selenium-manager must not run (it would download a browser)")

    monkeypatch.setattr(selenium_manager.SeleniumManager, "binary_paths", refuse)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-default-apps", "--disable-sync", "--metrics-recording-only",
                "--lang=en-GB"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield Browser(driver)
    finally:
        driver.quit()


@contextlib.contextmanager
def feeding(kafka: KafkaBroker, topic: str, partitions: int = 2) -> Iterator[list[int]]:
    """Produce a message every 0.2 s to ``topic`` while the block runs; yields [how many]."""
    stop = threading.Event()
    count = [0]

    def feed() -> None:
        while not stop.is_set():
            produce(kafka.bootstrap, topic, [json.dumps({"id": f"f{count[0]}", "name": "Flow"}).encode()],
                    partitions=partitions)
            count[0] += 1
            stop.wait(0.2)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join(10)


def sign_in_by_link(page: Browser, service: ServiceProcess, token: str = ADMIN_TOKEN) -> None:
    page.open(service, f"/ui/#token={token}")
    page.until(lambda: page.find("#jobs").is_displayed(), "the jobs table")
    page.until(lambda: page.text("#jobs-updated"), "the first refresh")


# -- the static files ---------------------------------------------------------------------

def test_the_dashboard_files_are_served_with_their_types_and_nothing_else(services: Start) -> None:
    s = services()
    redirect = s.request("GET", "/ui", token=None)
    assert redirect.status == 301 and redirect.headers["Location"] == "ui/"
    for path, kind in (("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
        answer = s.request("GET", path, token=None)
        assert answer.status == 200, path
        assert answer.headers["Content-Type"].split(";")[0] == kind
        assert "connect-src 'self'" in answer.headers["Content-Security-Policy"]
        name = "index.html" if path == "/ui/" else path[4:]
        assert answer.body == (REPO / "restconsumer" / "api" / "ui" / name).read_bytes()
    for outside in ("/ui/../routes.py", "/ui/%2e%2e/routes.py", "/ui/..%2froutes.py", "/ui/index.html/..",
                    "/ui/openapi.json", "/ui/ui/app.js", "/ui//etc/passwd"):
        answer = s.request("GET", outside, token=None)
        assert answer.status == 404 and answer.json["error"] == "not found", outside
    html = (REPO / "restconsumer" / "api" / "ui" / "index.html").read_text()
    script = (REPO / "restconsumer" / "api" / "ui" / "app.js").read_text()
    for text in (html, script, (REPO / "restconsumer" / "api" / "ui" / "app.css").read_text()):
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in \
            text.replace("https://example.org", ""), "the dashboard names another origin"


# -- in the browser -----------------------------------------------------------------------

def test_sign_in_by_the_token_link_jobs_appear_and_stop_from_the_page(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], sink: Sink,
        browser: Browser) -> None:
    s = services()
    name = topic(partitions=2)
    assert s.request("POST", "/job/people", job("people", "crm", name, sink.url)).status == 201
    produce(kafka.bootstrap, name, [json.dumps({"id": f"p{i}", "name": "Ann"}).encode()
                                    for i in range(20)], partitions=2)
    page = browser
    sign_in_by_link(page, s)
    assert ADMIN_TOKEN not in page.driver.current_url, "the token stayed in the address bar"
    assert page.driver.execute_script(
        "return sessionStorage.getItem('restconsumer.token')") == ADMIN_TOKEN
    page.until(lambda: "people" in page.rows(), "the job in the table")

    # A job created through the API appears by itself (the page refreshes on its own).
    assert s.request("POST", "/job/orders", job("orders", "shop", name, sink.url)).status == 201
    page.until(lambda: "orders" in page.rows(), "the new job in the table", timeout=15)
    header = [th.text for th in page.finds("#jobs-table thead th")]
    assert header == ["Job", "Owner", "State", "Circuit", "Delivered/s", "Lag", "Dead letters", "Last error"]

    # A job whose URL needs a value the messages lack dead-letters them, with the reason.
    invoices = {**job("invoices", "billing", name, sink.url), "datamap": {"invoice": "$.msg.invoice"},
                "url": f"{sink.url}/invoices/{{invoice}}", "json_body": ["invoice"]}
    assert s.request("POST", "/job/invoices", invoices).status == 201

    # While messages flow, the rows show what the API says: owner, state, circuit, rate, lag,
    # dead letters, last error.
    with feeding(kafka, name) as fed:
        def shown() -> bool:
            row = page.rows()["people"]
            status = s.request("GET", "/job/people/status").json
            return (row[1:4] == ["crm", "running", "closed"] and float(row[4]) > 0
                    and row[5] == str(status["total_lag"]) and row[6] == "0" and row[7] == "")

        page.until(shown, "people running with its rate and lag", timeout=30)

        page.until(lambda: int(page.rows()["invoices"][6].replace(",", "") or 0) > 0
                   and "the URL needs 'invoice'" in page.rows()["invoices"][7], "invoices failing")
        page.screenshot("jobs", height=420)
    total = 20 + fed[0]
    for job_id, counter in (("people", "delivered"), ("invoices", "dead_lettered")):
        wait_for(lambda j=job_id, c=counter:
                 s.request("GET", f"/job/{j}/status").json["counters"][c] == total,
                 40, f"every message counted for {job_id}")
    reason = s.request("GET", "/job/invoices/status").json["last_error"]["reason"]
    page.until(lambda: page.rows()["invoices"][6] == f"{total:,}"
               and page.rows()["invoices"][7].startswith(reason),
               "the dead letters counted and the last error shown")

    # To the job page from the keyboard, then stop it there.
    page.press("#jobs-table a[href='#/job/people']")
    page.until(lambda: page.find("#job").is_displayed() and page.text("#job-title") == "Job people",
               "the job page")
    page.until(lambda: page.text("#job-state") == "running", "running on its page")
    page.press("#stop")
    wait_for(lambda: s.request("GET", "/job/people/status").json["state"] == "stopped", 15,
             "the API reports it stopped")
    page.until(lambda: page.text("#job-state") == "stopped", "stopped on its page")
    assert "stopped" in page.text("#job-message")

    page.press("#start")
    wait_for(lambda: s.request("GET", "/job/people/status").json["state"] in ("running", "starting"),
             15, "started again")
    page.until(lambda: page.text("#job-state") in ("running", "starting"), "started on its page")

    # set_offset from the page: both partitions back to the beginning.
    page.type_into("#offset", "beginning")
    page.press("#offset-go")
    page.until(lambda: page.text("#job-message").startswith("Offsets set"), "the offsets moved", timeout=70)
    assert page.text("#job-message") == f"Offsets set: {name}[0] → 0, {name}[1] → 0."
    wait_for(lambda: s.request("GET", "/job/people/status").json["counters"]["delivered"] == 2 * total,
             40, "every message sent again from the beginning")
    page.assert_clean()


def test_a_job_with_two_mistakes_shows_both_next_to_their_fields(
        services: Start, topic: Callable[..., str], sink: Sink, browser: Browser) -> None:
    s = services()
    name = topic()
    bad = job("twomistakes", "ops", name, sink.url)
    bad["datamap"]["name"] = "$.msg[?(@.x =="
    bad["retry"] = {"initial_wait": 5, "max_wait": 1}
    refused = s.request("POST", "/job/twomistakes", bad)
    assert refused.status == 400
    reasons = {d["field"]: d["reason"] for d in refused.json["details"]}
    assert set(reasons) == {"datamap.name", "retry.max_wait"}

    page = browser
    sign_in_by_link(page, s)
    page.press("#nav a[href='#/new']")
    page.until(lambda: page.find("#new").is_displayed() and page.find("#editor-text").is_displayed(),
               "the editor")
    text = json.dumps(bad, indent=2)
    page.type_into("#editor-text", text)
    assert json.loads(page.find("#editor-text").get_property("value")) == bad
    browser.expected_failures.add((400, "/job/twomistakes"))
    page.press("#save")
    page.until(lambda: len(page.finds("#problems-list li")) == 2, "two problems listed")

    listed = {li.get_attribute("data-field"): li.text for li in page.finds("#problems-list li")}
    assert set(listed) == {"datamap.name", "retry.max_wait"}
    lines = text.split("\n")
    marked = {int(d.get_attribute("data-line")): d.text for d in page.finds("#editor-backdrop .line.bad")}
    assert len(marked) == 2, marked
    for field, line_start in (("datamap.name", '"name": "$.msg[?(@.x =="'),
                              ("retry.max_wait", '"max_wait": 1')):
        line = next(i for i, ln in enumerate(lines, 1) if ln.strip().startswith(line_start))
        assert line in marked, (field, line, marked)
        assert reasons[field] in marked[line], "the reason is not next to its field in the editor"
        assert listed[field].startswith(field) and reasons[field] in listed[field]
        assert f"(line {line})" in listed[field]
    assert page.find("#editor-text").get_attribute("aria-invalid") == "true"
    page.screenshot("editor", height=1100)
    assert s.request("GET", "/job/twomistakes").status == 404

    # Go to line: the caret lands on the field's line.
    page.finds("#problems-list li button")[1].send_keys(Keys.ENTER)
    caret = page.driver.execute_script(
        "const t = document.getElementById('editor-text');"
        "return t.value.slice(0, t.selectionStart).split('\\n').length")
    assert caret == int(page.finds("#problems-list li")[1].text.split("(line ")[1].split(")")[0])

    # Fixed, it saves and the page becomes the job's page.
    fixed = {**bad, "datamap": {"id": "$.msg.id", "name": "$.msg.name"}, "retry": {"max_wait": 10}}
    page.type_into("#editor-text", json.dumps(fixed, indent=2))
    assert not page.finds("#editor-backdrop .line.bad"), "marks stayed after the text changed"
    page.press("#save")
    page.until(lambda: page.find("#job").is_displayed() and page.text("#job-title") == "Job twomistakes",
               "the new job's page")
    assert s.request("GET", "/job/twomistakes").json["retry"] == {"max_wait": 10}
    page.assert_clean()


def test_a_preview_against_a_sample_message_shows_the_request(
        services: Start, topic: Callable[..., str], sink: Sink, browser: Browser) -> None:
    s = services()
    name = topic()
    page = browser
    sign_in_by_link(page, s)
    page.driver.get(f"{s.url}/ui/#/new")
    page.until(lambda: page.find("#editor-text").is_displayed(), "the editor")
    definition = job("dry", "ops", name, sink.url, headers={"X-Source": "kafka"})
    page.type_into("#editor-text", json.dumps(definition, indent=2))
    page.type_into("#sample", '{"id": "p7", "name": "Ann", "age": 41}')
    page.press("#preview")
    page.until(lambda: page.finds("#preview-out pre.request"), "the request shown")
    shown = page.text("#preview-out pre.request")
    assert shown.startswith(f"POST {sink.url}/dry/p7\n"), shown
    assert "X-Source: kafka" in shown
    assert json.loads(shown.split("\n\n", 1)[1]) == {"id": "p7", "name": "Ann"}
    assert s.request("GET", "/job/dry").status == 404, "a preview stored the job"

    # A stored job, unchanged in the editor, is previewed as stored: its secret stays hidden.
    secret = {**definition, "id": "dry2", "url": f"{sink.url}/dry2/{{id}}",
              "basic_auth": {"user": "u", "pw": "pw-dashboard-31"}}
    assert s.request("POST", "/job/dry2", secret).status == 201
    page.driver.get(f"{s.url}/ui/#/job/dry2")
    page.until(lambda: '"pw": "***"' in page.find("#editor-text").get_property("value"), "the definition")
    assert "pw-dashboard-31" not in page.text("#definition")
    page.type_into("#sample", "plain text, not JSON")
    page.press("#preview")
    page.until(lambda: page.finds("#preview-out h4"), "the preview")
    assert "not sent" in page.text("#preview-out h4")
    assert page.text("#preview-out .error") == "the URL needs 'id', which the datamap did not find"
    page.type_into("#sample", '{"id": "q1"}')
    page.press("#preview")
    page.until(lambda: page.finds("#preview-out pre.request"), "the request shown")
    shown = page.text("#preview-out pre.request")
    assert shown.startswith(f"POST {sink.url}/dry2/q1\n") and "\nAuthorization: Basic ***\n" in shown
    assert "pw-dashboard-31" not in page.driver.page_source
    assert sink.count() == 0, "a preview sent a request"
    page.assert_clean()


def test_dead_letters_listed_and_replayed_from_the_page(
        services: Start, kafka: KafkaBroker, topic: Callable[..., str], browser: Browser) -> None:
    refused = {"/letters/m2", "/letters/m5", "/letters/m9"}
    fixed = {"now": False}

    def answer(got: Received) -> tuple[int, dict[str, str], bytes]:
        time.sleep(0.02)
        if got.path in refused and not fixed["now"]:
            return 400, {}, b"no such person yet"
        return 200, {}, b"ok"

    sink = Sink(answer).start()
    try:
        name = topic(partitions=2)
        s = services()
        assert s.request("POST", "/job/letters", job("letters", "ops", name, sink.url)).status == 201
        page = browser
        sign_in_by_link(page, s)
        page.driver.get(f"{s.url}/ui/#/job/letters")
        page.until(lambda: page.text("#job-state") in ("running", "starting"), "the job page")
        for batch in range(4):
            produce(kafka.bootstrap, name, [json.dumps({"id": f"m{i}", "name": f"N{i}"}).encode()
                                            for i in range(batch * 3, batch * 3 + 3)], partitions=2)
            time.sleep(1.5)
        page.until(lambda: len(page.finds("#dl-table tbody tr")) == 3, "three dead letters listed",
                   timeout=40)
        rows = [[c.text for c in r.find_elements(By.TAG_NAME, "td")]
                for r in page.finds("#dl-table tbody tr")]
        assert sorted(json.loads(r[6])["id"] for r in rows) == ["m2", "m5", "m9"]
        for r in rows:
            assert r[1].startswith(f"{name}[") and r[2] == "400" and "no such person yet" in r[4]
        page.until(lambda: page.find("[data-counter='Dead letters']").text == "3", "the counter")
        assert page.find("[data-counter='Delivered']").text == "9"
        # max_in_flight "auto": what is on the wire, of the limit the job found (SPEC §11).
        under_way, limit = page.find("[data-counter='In flight']").text.split(" of ")
        assert int(under_way) >= 0 and int(limit) >= 1

        fixed["now"] = True
        before = sink.count()
        with feeding(kafka, name):  # traffic for the rate chart of the screenshot
            page.press("#replay")
            page.until(lambda: "Replay started" in page.text("#dl-message"), "the replay started")
            wait_for(lambda: refused <= {r.path for r in sink.snapshot()[before:]}, 30,
                     "the three sent again")
            page.until(lambda: page.text("#dl-message").startswith("Replay done"), "the replay done",
                       timeout=30)
            assert "3 replayed, 3 delivered, 0 dead-lettered again" in page.text("#dl-message")
            assert s.request("GET", "/job/letters/status").json["replay"]["delivered"] == 3
            page.until(lambda: len(page.finds("#rate-chart polyline")) == 1, "the rate chart")
            page.until(lambda: float(page.find("[data-counter='Delivered/s']").text) > 0, "the rate")
            assert len(page.finds("#lag-table tbody tr")) == 2
            time.sleep(6)  # a few more points on the chart
            page.screenshot("job", height=1900)
        assert sorted(r.path for r in sink.snapshot()[before:] if r.path in refused) == sorted(refused)
        page.assert_clean()
    finally:
        sink.stop()


def test_an_owner_token_sees_only_its_own_jobs(
        services: Start, topic: Callable[..., str], sink: Sink, tmp_path: Path, browser: Browser) -> None:
    tokens = tmp_path / "tokens.json"
    # team-a's jobs send to loopback, which its entry must grant (SPEC §8)
    tokens.write_text(json.dumps({"tok-team-a-51c": {"owner": "team-a", "destinations": ["127.0.0.1"]}}))
    s = services("--tokens", str(tokens))
    name = topic()
    for job_id, owner in (("a1", "team-a"), ("a2", "team-a"), ("b1", "team-b")):
        assert s.request("POST", f"/job/{job_id}", job(job_id, owner, name, sink.url)).status == 201
    page = browser
    sign_in_by_link(page, s, "tok-team-a-51c")
    page.until(lambda: set(page.rows()) == {"a1", "a2"}, "team-a's jobs")
    first = page.text("#jobs-updated")
    page.until(lambda: page.text("#jobs-updated") != first, "a refresh")
    assert set(page.rows()) == {"a1", "a2"}
    assert all(r[1] == "team-a" for r in page.rows().values())
    page.driver.get(f"{s.url}/ui/#/job/b1")
    browser.expected_failures.add((404, "/job/b1"))
    page.until(lambda: "No job b1" in page.text("#job-message"), "another owner's job not shown")
    assert page.text("#definition") == ""

    # Signed out, a wrong token is refused; the admin signs in with the form and sees every job.
    page.press("#signout")
    page.until(lambda: page.find("#signin").is_displayed(), "the sign-in form")
    assert page.driver.execute_script("return sessionStorage.getItem('restconsumer.token')") is None
    browser.expected_failures.add((401, "/jobs"))
    page.find("#token").send_keys("not-a-token", Keys.ENTER)
    page.until(lambda: "refused" in page.text("#signin-message"), "the wrong token refused")
    page.find("#token").send_keys(ADMIN_TOKEN, Keys.ENTER)
    page.until(lambda: set(page.rows()) == {"a1", "a2", "b1"}, "every job for the admin")
    page.assert_clean()


def test_every_control_has_a_label_and_the_checks_catch_another_origin(
        services: Start, topic: Callable[..., str], sink: Sink, browser: Browser) -> None:
    s = services()
    assert s.request("POST", "/job/labels", job("labels", "ops", topic(), sink.url)).status == 201
    page = browser
    sign_in_by_link(page, s)
    unlabelled = """
        return [...document.querySelectorAll('input, textarea, select, button, a[href]')]
          .filter(e => e.offsetParent !== null)
          .filter(e => !((e.labels && e.labels.length) || e.getAttribute('aria-label')
                         || e.getAttribute('aria-labelledby') || e.textContent.trim()))
          .map(e => e.outerHTML.slice(0, 120));"""
    for where in ("#/", "#/new", "#/job/labels"):
        page.driver.get(f"{s.url}/ui/{where}")
        page.until(lambda: page.text("#jobs-updated") or page.text("#job-updated")
                   or page.find("#new").is_displayed(), f"{where} shown")
        time.sleep(0.5)
        assert page.driver.execute_script(unlabelled) == [], where
    page.assert_clean()
    # The checks themselves: a request to another origin is caught (the policy blocks it and
    # says so on the console).
    page.driver.execute_script("fetch('http://127.0.0.2:9/leak').catch(() => {})")
    time.sleep(0.5)
    with pytest.raises(AssertionError, match=r"127\.0\.0\.2"):
        page.assert_clean()
