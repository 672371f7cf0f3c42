"""Against a real ``prefect server`` on loopback: serve, deploy, schedules, UI data, events.

The server, ``herald serve``, ``herald deploy`` and the worker run as subprocesses, as an
operator would start them; every assertion reads the server's API.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiosmtpd.controller import Controller
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun

from .helpers import PROMO_YAML, free_port, outbox_messages

pytestmark = [pytest.mark.prefect, pytest.mark.prefect_server]

BIN = Path(sys.executable).parent
HERALD = shutil.which("herald", path=str(BIN)) or "herald"
PREFECT = shutil.which("prefect", path=str(BIN)) or "prefect"
REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def _env(home: Path, api: str | None = None) -> dict[str, str]:
    # Prefect's scheduler and runners work in real time, so served runs here read the real
    # clock too (HERALD_NOW, set by `make test HERALD_TEST_NOW=...`, is not passed on).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") and k != "HERALD_NOW"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_LOGGING_LEVEL="INFO")
    if api:
        env["PREFECT_API_URL"] = api
    return env


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 90.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Server:
    """A ``prefect server start`` subprocess with its own home and database."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.url = f"http://127.0.0.1:{free_port()}/api"
        port = self.url.split(":")[2].split("/")[0]
        env = _env(home / "server")
        env.update(PREFECT_UI_ENABLED="false",
                   PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1")
        self.log = (home / "server.log").open("wb")
        self.proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1",
                                      "--port", port], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for(self._healthy, "prefect server to start", timeout=120)

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("prefect server exited: "
                                 + (self.home / "server.log").read_text()[-2000:])
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> SyncPrefectClient:
        return SyncPrefectClient(self.url)

    def env(self, name: str) -> dict[str, str]:
        return _env(self.home / name, self.url)

    def events(self, prefix: str) -> list[dict[str, Any]]:
        body = {"filter": {"event": {"prefix": [prefix]}}, "limit": 50}
        response = httpx.post(f"{self.url}/events/filter", json=body, timeout=10)
        response.raise_for_status()
        return list(response.json()["events"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("prefect"))
    yield srv
    srv.stop()


class Background:
    """A long-running command (``herald serve``, a worker), stopped like Ctrl-C."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self.log = log.open("wb")
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def background() -> Iterator[Callable[..., Background]]:
    started: list[Background] = []

    def start(args: list[str], env: dict[str, str], log: Path) -> Background:
        started.append(Background(args, env, log))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def deployment_of(srv: Server, flow: str, ws: Any) -> Any:
    """The deployment of ``flow`` once it points at ``ws`` (tests share flow names)."""
    def read() -> Any:
        with srv.client() as client:
            found = client.read_deployments(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[flow])))
        return next((d for d in found if d.parameters.get("workspace") == str(ws.root)),
                    None)

    return wait_for(read, f"deployment herald-campaign/{flow}")


def finished(srv: Server, run_id: Any, timeout: float = 120.0) -> FlowRun:
    def read() -> FlowRun | None:
        with srv.client() as client:
            run = client.read_flow_run(run_id)
        return run if run.state is not None and run.state.is_final() else None

    return wait_for(read, f"flow run {run_id} to finish", timeout)


def recorded_tasks(srv: Server, run_id: Any, count: int, timeout: float = 60.0) -> list[Any]:
    """The flow run's task runs once the server holds at least ``count`` of them, each in
    a final state. The server records task runs from the events a run sends, after the
    run's own final state (written through the API) can be read: read at once, a task run
    may still stand at its first event, Pending and under Prefect's default name
    (``journey-chunk-e2a``), its rename to ``chunk-0001`` not yet recorded."""
    def read() -> list[Any] | None:
        with srv.client() as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[run_id])))
        final = len(tasks) >= count and all(t.state is not None and t.state.is_final()
                                            for t in tasks)
        return tasks if final else None

    return wait_for(read, f"{count} task runs of flow run {run_id} recorded as finished",
                    timeout)


def served_run(srv: Server, background: Any, ws: Any, run_key: str) -> tuple[Any, FlowRun]:
    """``herald serve promo`` started, one run of its deployment triggered under
    ``run_key`` and finished (completed): the deployment and that run."""
    serve = background([HERALD, "serve", "promo", "-w", str(ws.root)], srv.env("serve"),
                       ws.root / "serve.log")
    dep = deployment_of(srv, "promo", ws)
    serve.alive()
    with srv.client() as client:
        created = client.create_flow_run_from_deployment(dep.id, parameters={
            "run_key": run_key})
    run = finished(srv, created.id)
    assert run.state is not None and run.state.is_completed(), run.state
    return dep, run


def follow_up_of(srv: Server, dep: Any, first: FlowRun, what: str) -> FlowRun:
    """The run Herald scheduled on ``dep`` after ``first``, under its run key."""
    def later() -> FlowRun | None:
        with srv.client() as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id={"any_": [dep.id]}))
        found = [r for r in runs if r.id != first.id
                 and r.parameters.get("run_key") == first.parameters.get("run_key")]
        return found[0] if found else None

    return wait_for(later, what)


def schedules_yaml(*entries: str) -> str:
    return PROMO_YAML + "schedules:\n" + "".join(entries)


def test_served_flow_runs_from_the_api_and_from_its_schedule(
        make_workspace, server, background) -> None:
    soon = (datetime.now(UTC) + timedelta(seconds=25)).replace(microsecond=0)
    ws = make_workspace({"config/flows/promo.yaml": schedules_yaml(
        '  - {name: daily, cron: "0 10 * * *", timezone: Asia/Shanghai}\n',
        f"  - {{name: soon, interval: 1d, anchor: '{soon:%Y-%m-%dT%H:%M:%S}', "
        "timezone: UTC}\n",
        "  - {name: hourly, interval: 1h, active: false}\n")}, rows=100)
    serve = background([HERALD, "serve", "promo", "-w", str(ws.root)], server.env("serve"),
                       ws.root / "serve.log")
    dep = deployment_of(server, "promo", ws)
    serve.alive()
    assert dep.entrypoint == "herald.flows.campaign.campaign"
    assert dep.parameters == {"workspace": str(ws.root), "flow_name": "promo"}
    assert set(dep.tags) == {"herald", "flow:promo", "segment:people", "channel:email",
                             "channel:sms"}
    by_slug = {s.slug: s for s in dep.schedules}
    assert set(by_slug) == {"promo-daily", "promo-soon", "promo-hourly"}
    assert by_slug["promo-daily"].schedule.cron == "0 10 * * *"
    assert by_slug["promo-daily"].schedule.timezone == "Asia/Shanghai"
    assert by_slug["promo-hourly"].active is False and by_slug["promo-daily"].active

    # A run triggered through the API, as the UI's "Run" button does.
    with server.client() as client:
        created = client.create_flow_run_from_deployment(dep.id, parameters={
            "run_key": "api-1"})
    run = finished(server, created.id)
    assert run.state is not None and run.state.is_completed(), run.state
    assert run.name == "promo/api-1"
    assert {"flow:promo", "segment:people", "channel:email", "channel:sms"} <= set(run.tags)
    tasks = recorded_tasks(server, run.id, 4)
    with server.client() as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert sorted(t.name for t in tasks) == ["build-audience", "chunk-0000", "chunk-0001",
                                             "chunk-0002"]
    assert all(t.state is not None and t.state.is_completed() for t in tasks)
    by_key = {a.key: a for a in artifacts}
    assert "| gold | 25 |" in by_key["herald-promo-audience"].data
    assert "SQL sha256" in by_key["herald-promo-audience"].data
    delivery = by_key["herald-promo-delivery"].data
    assert "| channel | sent | no_address |" in delivery
    assert "| tier | sent | no_address |" in delivery and "| gold | " in delivery
    assert "| **all** | **98** | **2** |" in delivery and "No failed sends." in delivery
    assert by_key["herald-promo-progress"].data == 100.0
    assert by_key["herald-promo-progress"].description.startswith(
        "3/3 chunks · 100/100 recipients · sent 98 · failed 0")
    assert "| chunks | 3 / 3 |" in by_key["herald-promo-sending"].data
    assert outbox_messages(ws) == 98

    # The finished run's event, with its counts, for automations.
    event = wait_for(lambda: [e for e in server.events("herald.run.completed")
                              if e["resource"]["herald.run-key"] == "api-1"], "run event")[0]
    assert event["resource"]["prefect.resource.id"] == "herald.flow.promo"
    assert event["payload"]["deliveries"] == {"sent": 98, "no_address": 2}
    assert event["payload"]["failure_rate"] == 0.0
    assert any(r["prefect.resource.id"] == f"prefect.flow-run.{run.id}"
               for r in event["related"])

    # Upcoming runs of the schedules are named FLOW/RUN_KEY while they wait (herald serve
    # renames what Prefect's scheduler created), not "upbeat-worm".
    def upcoming() -> list[FlowRun]:
        with server.client() as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id={"any_": [dep.id]}))
        return [r for r in runs if r.auto_scheduled and r.state is not None
                and r.state.is_scheduled() and r.expected_start_time is not None
                and r.expected_start_time > soon + timedelta(minutes=5)]

    named = wait_for(lambda: [r for r in upcoming() if r.name.startswith("promo/")],
                     "named upcoming runs", 60)
    for r in named:  # the key: the scheduled time in the flow's time zone (UTC here)
        assert r.expected_start_time is not None
        assert r.name == f"promo/{r.expected_start_time.astimezone(UTC):%Y-%m-%dT%H:%M}"

    # The scheduled run: named and keyed after its scheduled time; nobody sent twice.
    def scheduled_run() -> FlowRun | None:
        with server.client() as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id={"any_": [dep.id]}))
        due = [r for r in runs if r.auto_scheduled and r.expected_start_time is not None
               and abs((r.expected_start_time - soon).total_seconds()) < 1]
        return due[0] if due else None

    sched = finished(server, wait_for(scheduled_run, "the scheduled run").id)
    assert sched.state is not None and sched.state.is_completed(), sched.state
    assert sched.name == f"promo/{soon:%Y-%m-%dT%H:%M}"
    with server.client() as client:
        again = client.create_flow_run_from_deployment(dep.id, parameters={
            "run_key": f"{soon:%Y-%m-%dT%H:%M}"})
    assert finished(server, again.id).state.is_completed()  # type: ignore[union-attr]
    assert outbox_messages(ws) == 98 * 2  # the api-1 run and the scheduled one, once each
    logs = serve.output()
    assert "audience package" in logs and "finished: sent=98, no_address=2" in logs
    assert "@example.com" not in logs and "+1415555" not in logs  # no contact details


def test_served_journey_ticks_on_its_schedule(make_workspace, server, background) -> None:
    from .helpers import JOURNEY_FILES, crm_events

    soon = (datetime.now(UTC) + timedelta(seconds=25)).replace(microsecond=0)
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/hello.yaml": (
        "name: hello\n"
        "entry: {source: crm, segment: nudge_entry, params: {min_score: 0}, key: id}\n"
        "chunk_size: 40\n"
        f"schedules: [{{name: soon, interval: 1d, anchor: '{soon:%Y-%m-%dT%H:%M:%S}', "
        "timezone: UTC}]\n"
        "steps:\n  hi: {type: send, tiers: {default: {channels: [email]}}}\n"),
        "templates/hello/hi/default.email.subject.j2": "Hello {{ name }}",
        "templates/hello/hi/default.email.txt.j2": "Welcome, {{ name }}."},
        rows=100, folder="journey")
    crm_events(ws)
    serve = background([HERALD, "serve", "hello", "-w", str(ws.root)], server.env("serve"),
                       ws.root / "serve.log")
    dep = deployment_of(server, "hello", ws)
    serve.alive()
    assert dep.entrypoint == "herald.flows.journey.journey"
    assert dep.parameters == {"workspace": str(ws.root), "journey_name": "hello"}
    assert set(dep.tags) == {"herald", "journey:hello"}
    assert [s.slug for s in dep.schedules] == ["journey-hello-soon"]

    def scheduled_tick() -> FlowRun | None:
        with server.client() as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id={"any_": [dep.id]}))
        # the scheduler also creates the next days' runs: take the one due now
        return next((r for r in runs if r.auto_scheduled and r.expected_start_time
                     and abs((r.expected_start_time - soon).total_seconds()) < 1), None)

    tick = finished(server, wait_for(scheduled_tick, "the scheduled tick").id)
    assert tick.state is not None and tick.state.is_completed(), tick.state
    tasks = recorded_tasks(server, tick.id, 3)
    with server.client() as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[tick.id])))
    assert sorted(t.name for t in tasks) == ["chunk-0000", "chunk-0001", "chunk-0002"]
    assert "herald-journey-hello-funnel" in {a.key for a in artifacts}
    assert outbox_messages(ws) == 86  # every 7th person has no e-mail address
    logs = serve.output()
    assert "journey hello tick" in logs and "100 entered, 100 to look at in 3 chunks" in logs
    assert "@example.com" not in logs  # no contact details


def test_failed_run_says_why_in_its_state(make_workspace, server, background) -> None:
    ws = make_workspace(rows=20)
    serve = background([HERALD, "serve", "promo", "-w", str(ws.root)], server.env("serve"),
                       ws.root / "serve.log")
    dep = deployment_of(server, "promo", ws)
    serve.alive()
    import sqlite3

    with sqlite3.connect(ws.root / "crm.db") as conn:  # the CRM table goes away
        conn.execute("ALTER TABLE people RENAME TO people_old")
    with server.client() as client:
        created = client.create_flow_run_from_deployment(dep.id, parameters={
            "run_key": "broken"})
    run = finished(server, created.id)
    assert run.state is not None and run.state.is_failed()
    assert "Traceback" not in serve.output()  # one line per failed run, not a traceback
    assert "audiences/people.sql" in (run.state.message or "")
    assert "no such table: people" in (run.state.message or "")
    event = wait_for(lambda: [e for e in server.events("herald.run.failed")
                              if e["resource"]["herald.run-key"] == "broken"], "failure event")
    assert "audiences/people.sql" in event[0]["payload"]["error"]


def test_serving_a_changed_schedule_updates_the_deployment(make_workspace, server,
                                                           background) -> None:
    ws = make_workspace({"config/flows/promo.yaml": schedules_yaml(
        '  - {name: morning, cron: "0 9 * * *"}\n',
        "  - {name: often, interval: 6h}\n")}, folder="changing")
    first = background([HERALD, "serve", "promo", "-w", str(ws.root)], server.env("serve"),
                       ws.root / "serve1.log")
    before = wait_for(lambda: (d := deployment_of(server, "promo", ws)) and
                      {s.slug for s in d.schedules} == {"promo-morning", "promo-often"} and d,
                      "first schedules")
    first.stop()

    (ws.root / "config/flows/promo.yaml").write_text(schedules_yaml(
        '  - {name: morning, cron: "30 8 * * 1-5"}\n',
        '  - {name: weekly, rrule: "FREQ=WEEKLY;BYDAY=SA;BYHOUR=10;BYMINUTE=0", '
        "active: false}\n"))
    second = background([HERALD, "serve", "promo", "-w", str(ws.root)], server.env("serve"),
                        ws.root / "serve2.log")

    def updated() -> Any:
        second.alive()
        dep = deployment_of(server, "promo", ws)
        return dep if {s.slug for s in dep.schedules} == {"promo-morning",
                                                          "promo-weekly"} else None

    after = wait_for(updated, "the changed schedules")
    assert after.id == before.id and after.version != before.version
    by_slug = {s.slug: s for s in after.schedules}
    assert by_slug["promo-morning"].schedule.cron == "30 8 * * 1-5"
    assert by_slug["promo-morning"].active is True
    assert by_slug["promo-weekly"].active is False
    assert "FREQ=WEEKLY" in by_slug["promo-weekly"].schedule.rrule
    with server.client() as client:
        named = client.read_deployments(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=["promo"])))
    assert len(named) == 1


def test_deploy_to_a_work_pool_and_a_worker_runs_it(make_workspace, server, background
                                                    ) -> None:
    ws = make_workspace(rows=30, folder="pooled")
    missing = subprocess.run([HERALD, "deploy", "promo", "--pool", "nowhere", "-w",
                              str(ws.root)], env=server.env("cli"), capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 1
    assert "work pool 'nowhere' not found" in missing.stderr
    with server.client() as client:
        client.create_work_pool(WorkPoolCreate(name="herald-pool", type="process"))
    done = subprocess.run([HERALD, "deploy", "promo", "--pool", "herald-pool", "-w",
                           str(ws.root)], env=server.env("cli"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "herald-campaign/promo → pool herald-pool" in done.stdout
    dep = deployment_of(server, "promo", ws)
    assert dep.work_pool_name == "herald-pool"
    with server.client() as client:
        created = client.create_flow_run_from_deployment(dep.id, parameters={
            "run_key": "pooled-1"})
    background([PREFECT, "worker", "start", "--pool", "herald-pool", "--type", "process"],
               server.env("worker"), ws.root / "worker.log")
    run = finished(server, created.id, timeout=150)
    assert run.state is not None and run.state.is_completed(), run.state
    assert run.name == "promo/pooled-1"
    assert outbox_messages(ws) == 30  # ids 1-30: everyone has an email or a phone


class _Hook(BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length") or 0)
        type(self).received.append(self.rfile.read(length))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


def test_alert_event_fires_the_documented_automation(make_workspace, server, background
                                                     ) -> None:
    """A run whose failure rate passes the threshold emits herald.run.alert; the
    README's automation turns it into a notification (here, a webhook on loopback)."""
    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    with ExitStack() as stack:
        stack.callback(hook.server_close)
        stack.callback(hook.shutdown)
        # The README's setup lines, as written, run from the repository (only the hook's
        # URL is this test's); they leave herald-alert.yaml in a scratch copy.
        readme = (REPO / "README.md").read_text()
        lines = readme.split("<!-- alert-setup -->")[1].split("<!-- /alert-setup -->")[0]
        script = lines.split("```sh\n")[1].split("```")[0].replace(
            "https://ops.example/hooks/herald", f"http://127.0.0.1:{hook.server_port}/alert")
        scratch = Path(server.home) / "repo"
        (scratch / "docs").mkdir(parents=True)
        shutil.copytree(REPO / "docs" / "automations", scratch / "docs" / "automations")
        (scratch / ".venv").symlink_to(BIN.parent)
        made = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=scratch,
                              env=server.env("cli"), capture_output=True, text=True,
                              timeout=180)
        assert made.returncode == 0, made.stdout + made.stderr
        assert "<your-notification-block-id>" not in (scratch / "herald-alert.yaml"
                                                       ).read_text()

        # an SMTP server refusing every recipient: each e-mail fails for good, one by one
        # (a server that does not answer stops the channel and fails the run instead)
        smtp = Controller(_RefuseAll(), hostname="127.0.0.1", port=free_port())
        smtp.start()
        stack.callback(smtp.stop)
        ws = make_workspace({
            "config/herald.yaml": (
                "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\n"
                "channels:\n  email: {type: smtp, host: 127.0.0.1, port: "
                f"{smtp.port}, security: none, sender: shop@example.com, timeout: 2}}\n"
                "  sms: {type: outbox, kind: sms}\nalerts: {failure_rate: 0.1}\n"),
            "config/flows/promo.yaml": PROMO_YAML.replace(
                "default: {channels: [sms, email]}", "default: {channels: [email]}")},
            rows=20, folder="alerting")
        serve = background([HERALD, "serve", "promo", "-w", str(ws.root)],
                           server.env("serve"), ws.root / "serve.log")
        dep = deployment_of(server, "promo", ws)
        serve.alive()
        with server.client() as client:
            created = client.create_flow_run_from_deployment(dep.id, parameters={
                "run_key": "alerting"})
        assert finished(server, created.id).state.is_completed()  # type: ignore[union-attr]
        alert = wait_for(lambda: [e for e in server.events("herald.run.alert")
                                  if e["resource"]["herald.run-key"] == "alerting"],
                         "alert event")[0]
        assert alert["payload"]["failure_rate"] > 0.1
        assert alert["payload"]["threshold"] == 0.1
        body = wait_for(lambda: _Hook.received, "the automation's notification", 60)[0]
        assert b"promo" in body and b"failure rate" in body


class _RefuseAll:
    """An aiosmtpd handler that refuses every recipient (550: a hard bounce)."""

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: Any) -> str:
        return "550 5.1.1 no such user"


def test_deferred_recipients_are_sent_by_the_follow_up_run_herald_schedules(
        make_workspace, server, background) -> None:
    """Quiet hours `defer`: the served run schedules its own follow-up on the deployment
    for the moment the window ends, and that run sends the deferred recipients."""
    now = datetime.now(UTC)
    end = (now + timedelta(seconds=90)).replace(second=0, microsecond=0)
    start = now - timedelta(hours=2)
    ws = make_workspace({"config/flows/promo.yaml": PROMO_YAML + (
        f'quiet_hours: {{from: "{start:%H:%M}", to: "{end:%H:%M}", mode: defer}}\n')},
        rows=12, folder="quiet")
    dep, first = served_run(server, background, ws, "night")
    assert outbox_messages(ws) == 0
    scheduled = follow_up_of(server, dep, first, "the follow-up run")
    assert scheduled.expected_start_time is not None
    assert abs((scheduled.expected_start_time - end).total_seconds()) < 1
    done = finished(server, scheduled.id, timeout=240)
    assert done.state is not None and done.state.is_completed(), done.state
    assert done.name == "promo/night"
    assert outbox_messages(ws) == 12  # ids 1-12 all have an address; each sent once


def test_experiment_follow_up_decides_and_sends_the_winner_to_the_rest(
        make_workspace, server, background) -> None:
    """Test then winner: the served run sends the variants to the test share and schedules
    its follow-up on the deployment at the decision time; that run names the winner from
    the conversions and sends it to the rest only."""
    import json
    import sqlite3
    from collections import Counter

    from sqlalchemy import func, select

    from herald.core.db import deliveries, experiments
    from herald.delivery import ledger_reads

    from .test_experiments import TEST_THEN_WINNER, files, sent_messages

    experiment = TEST_THEN_WINNER.replace("decide_after: 2d", "decide_after: 1m") % "stop"
    ws = make_workspace(files(experiment), rows=200, folder="experiment")
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("CREATE TABLE orders (customer INTEGER, placed_at TEXT, amount REAL)")
    dep, first = served_run(server, background, ws, "ab")
    with ws.store.connect() as conn:
        rows = ledger_reads.existing(conn, "promo", "ab", [str(i) for i in range(1, 201)])
        decide_at = conn.execute(select(experiments.c.decide_at)).scalar_one()
    tested = {k for k, r in rows.items() if r.status == "sent"}
    waiting = {k for k, r in rows.items() if r.status == "deferred"}
    assert tested and waiting and len(sent_messages(ws)) == len(tested)
    # during the test, b's recipients order and a's do not: a second after the last send
    # (a time cut to the second could fall before a send in the same second) and well
    # before the decision a minute later
    with ws.store.connect() as conn:
        last_sent = conn.execute(select(func.max(deliveries.c.sent_at))).scalar_one()
    last_sent = last_sent if last_sent.tzinfo else last_sent.replace(tzinfo=UTC)
    placed = (max(last_sent, datetime.now(UTC)) + timedelta(seconds=1)).strftime(
        "%Y-%m-%d %H:%M:%S")
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.executemany("INSERT INTO orders VALUES (?, ?, 1.0)",
                         [(int(k), placed) for k in tested if rows[k].variant == "b"])

    scheduled = follow_up_of(server, dep, first, "the decision's follow-up run")
    assert scheduled.expected_start_time is not None
    expected = decide_at if decide_at.tzinfo else decide_at.replace(tzinfo=UTC)
    assert abs((scheduled.expected_start_time - expected).total_seconds()) < 1
    done = finished(server, scheduled.id, timeout=240)
    assert done.state is not None and done.state.is_completed(), done.state
    with ws.store.connect() as conn:
        after = ledger_reads.existing(conn, "promo", "ab", [str(i) for i in range(1, 201)])
        decision = conn.execute(select(experiments)).one()
    assert (decision.status, decision.winner, decision.outcome) == ("decided", "b", "winner")
    assert json.loads(decision.figures)["verdict"]["winner"] == "b"
    assert {(after[k].status, after[k].variant) for k in waiting} == {("sent", "b")}
    per_person = Counter(m["recipient"] for m in sent_messages(ws))
    assert set(per_person) == tested | waiting and set(per_person.values()) == {1}


def test_a_served_run_hands_its_chunks_to_worker_processes(make_workspace, server,
                                                            background) -> None:
    """A deployment's run of a workspace with ``task_runner: processes`` (``herald
    serve``): its chunk tasks hand the chunks to worker processes of the run's process."""
    import json
    import sqlite3

    from .helpers import HERALD_YAML

    ws = make_workspace({"config/herald.yaml": HERALD_YAML + (
        "task_runner: {type: processes, workers: 2}\n")}, rows=120, folder="spread")
    dep, run = served_run(server, background, ws, "spread")
    with sqlite3.connect(ws.root / ".herald" / "herald.db") as conn:
        summary, owner = conn.execute("SELECT summary, owner FROM herald_runs WHERE "
                                      "run_key = 'spread' AND status = 'completed'"
                                      ).fetchone()
        statuses = dict(conn.execute("SELECT status, count(*) FROM herald_deliveries "
                                     "WHERE run_key = 'spread' GROUP BY status").fetchall())
    figures = json.loads(summary)
    # the chunks ran in one or two workers, none of them the flow run's own process
    assert figures["chunks"] == 3 and 1 <= len(figures["workers"]) <= 2
    assert owner and owner not in figures["workers"]
    assert sum(statuses.values()) == 120 and statuses["sent"] == outbox_messages(ws) > 100
    tasks = recorded_tasks(server, run.id, 4)
    assert sorted(t.name for t in tasks if t.name.startswith("chunk-")) == [
        "chunk-0000", "chunk-0001", "chunk-0002"]
    assert all(t.state is not None and t.state.is_completed() for t in tasks)
