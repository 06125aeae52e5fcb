"""Service identity sources: config map, /proc (two processes on one host told
apart), the protocol's self-description, reverse DNS, the upstream's listener."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from correlate.identity import ConnInfo, Identities
from sniff.events import ConnIdentity, ProxyUpstream
from sniff.procinfo import ProcResolver, process_name
from tests.conftest import require_server
from tests.helpers import AsyncServer

_CLIENT = """
import pika, sys
conn = pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1', int(sys.argv[1]), heartbeat=0))
ch = conn.channel()
ch.queue_declare(sys.argv[2], auto_delete=True)
ch.basic_publish('', sys.argv[2], b'from ' + sys.argv[3].encode())
import time; time.sleep(1.0)  # a service keeps its connection; the /proc lookup runs in the capture process
conn.close()
"""


def _run_client(tmp: Any, port: int, name: str, queue: str) -> int:
    script = tmp / f"{name}.py"
    script.write_text(_CLIENT)
    p = subprocess.Popen([sys.executable, str(script), str(port), queue, name])
    assert p.wait(30) == 0
    return p.pid


def test_two_processes_on_one_host_are_two_components(sniff_run: Any, tmp_path: Any) -> None:
    require_server("rabbitmq")
    proc = sniff_run([{"protocol": "amqp", "upstream": "127.0.0.1:5672"}])
    queue = f"sniff-ident-{os.getpid()}"
    pid_a = _run_client(tmp_path, proc.port(), "nova_scheduler", queue)
    pid_b = _run_client(tmp_path, proc.port(), "nova_conductor", queue)
    time.sleep(0.3)  # the /proc lookups finish off the event loop
    proc.stop()
    idents = [
        e
        for e in proc.events("core.identity")
        if isinstance(e, ConnIdentity) and e.source == "proc"
    ]
    pids = {int(e.attrs["pid"]) for e in idents if e.attrs}
    assert {pid_a, pid_b} <= pids
    names = {e.attrs["name"] for e in idents if e.attrs}
    assert {"nova_scheduler", "nova_conductor"} <= names  # the script each interpreter runs
    prods = [s for s in proc.spans() if s.kind == "PRODUCER"]
    assert {s.resource["process.pid"] for s in prods} == {pid_a, pid_b}
    # pika's product name is the library's, shared by both: each process is named
    # after the script it runs, and keyed by its pid
    by_pid = {s.resource["process.pid"]: s.service for s in prods}
    assert by_pid == {pid_a: "nova_scheduler", pid_b: "nova_conductor"}
    assert all("nova_" in s.resource["process.command_line"] for s in prods)


def test_config_map_wins_and_upstream_listener_is_known(sniff_run: Any) -> None:
    async def echo(reader: Any, writer: Any) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        await reader.read(100)  # until the client leaves
        writer.close()

    with AsyncServer(echo) as up:
        proc = sniff_run(
            [{"name": "echo-svc", "protocol": "tcp", "upstream": f"127.0.0.1:{up.port}"}],
            services={"127.0.0.0/8": "configured-client"},
        )
        import socket

        with socket.create_connection(("127.0.0.1", proc.port())) as s:
            s.sendall(b"hi")
            assert s.recv(10) == b"hi"
            time.sleep(1.0)
        proc.stop()
    ups = [e for e in proc.events("core.proxy_upstream") if isinstance(e, ProxyUpstream)]
    assert ups and ups[0].proxy == "echo-svc"
    assert (
        int(ups[0].processes[0]["pid"]) == os.getpid()
    )  # the echo server runs in this test process
    server_side = [e for e in proc.events("core.identity") if e.source == "proc.server"]
    assert server_side and int(server_side[0].attrs["pid"]) == os.getpid()
    from correlate.offline import conn_services

    r = proc.reader()
    names = {name for name, _ in conn_services(r, {"127.0.0.0/8": "configured-client"}).values()}
    r.close()
    assert names == {"configured-client"}


def _info(**identity: dict[str, str]) -> ConnInfo:
    return ConnInfo(
        1, "nova-api", "http", "10.0.0.5", 5000, "10.0.0.9", 8774, 0, identity=dict(identity)
    )


def test_naming_precedence() -> None:
    ids = Identities({"10.0.0.0/24": "from-config"})
    assert ids.client(_info(proc={"pid": "5", "name": "p"})).name == "from-config"
    ids = Identities()
    # self-description names a process; the pid keys the component
    c = ids.client(
        _info(
            proc={"pid": "5", "name": "python3", "host": "h"},
            **{"amqp.client_properties": {"connection_name": "nova-conductor"}},
        )
    )
    assert (c.key, c.name) == ("pid:h:5", "nova-conductor")
    # a process serving behind a proxy is named after it, whatever it says of itself
    ids.upstream("nova-api", [{"pid": "5", "host": "h"}])
    c = ids.client(
        _info(
            proc={"pid": "5", "name": "uwsgi", "host": "h"},
            **{"mysql.connect_attrs": {"program_name": "pymysql"}},
        )
    )
    assert c.name == "nova-api"
    # reverse DNS when nothing else knows (compose service names)
    c = ids.client(_info(rdns={"name": "glance-api"}))
    assert (c.key, c.name) == ("dns:glance-api", "glance-api")
    assert ids.client(_info()).name == "http-client@10.0.0.5"
    s = ids.server(_info(**{"proc.server": {"pid": "9", "host": "h"}}))
    assert (s.key, s.name) == ("pid:h:9", "nova-api")


def test_a_connection_too_short_for_proc_joins_the_only_process_of_its_name() -> None:
    ids = Identities()
    ids.upstream("api", [{"pid": "41", "host": "h"}])
    known = ids.client(_info(proc={"pid": "41", "host": "h"}))
    assert known.key == "pid:h:41"
    # the lookup came back empty, but the connection says it is "api": one process is
    short = ids.client(_info(proc={}, **{"mysql.connect_attrs": {"program_name": "api"}}))
    assert short.key == "pid:h:41" and short.resource["process.pid"] == 41
    # two processes of that name: no guess
    ids.upstream("api", [{"pid": "42", "host": "h"}])
    other = ids.client(_info(proc={}, **{"mysql.connect_attrs": {"program_name": "api"}}))
    assert other.key == "self:api"


def test_process_names() -> None:
    assert (
        process_name("/usr/bin/python3.11", ["python3", "-m", "nova.cmd.api", "--x"])
        == "nova.cmd.api"
    )
    assert process_name("/usr/bin/python3", ["python3", "-u", "/opt/svc/worker.py"]) == "worker"
    assert process_name("/usr/sbin/uwsgi", ["uwsgi", "--ini", "x"]) == "uwsgi"


def test_reverse_dns_of_a_peer() -> None:
    got: list[ConnIdentity] = []
    r = ProcResolver(got.append)
    try:
        assert r._reverse_dns("127.0.0.1") == "localhost"
        assert r._reverse_dns("192.0.2.1") is None  # TEST-NET: no PTR record
    finally:
        r.close()


def test_oslo_messaging_connection_names_name_the_program_and_key_the_process() -> None:
    """oslo.messaging names each AMQP connection "<program>:<pid>:<uuid>": every
    connection of one process must be one component named after the program."""
    ids = Identities()

    def oslo(conn_uuid: str, pid: int = 4242, **identity: dict[str, str]) -> ConnInfo:
        cp = {"connection_name": f"nova-conductor:{pid}:{conn_uuid}", "product": "py-amqp"}
        return _info(**{"amqp.client_properties": cp}, **identity)

    # in a sidecar (no /proc for the peer): keyed by address, program and pid
    a = ids.client(oslo("0b4cbd8e-6a8f-4a4e-9a43-5b3f0c1d2e3f"))
    b = ids.client(oslo("6f1d2c3b-1111-4222-8333-944455556666"))
    assert a.name == b.name == "nova-conductor"
    assert a.key == b.key == "self:10.0.0.5:nova-conductor:4242"
    assert a.resource["process.pid"] == 4242
    other = ids.client(oslo("7a7a7a7a-1111-4222-8333-944455556666", pid=4243))
    assert other.name == "nova-conductor" and other.key != a.key
    # with /proc the process found keys it; the name is still the program's
    c = ids.client(oslo("x", proc={"pid": "77", "name": "python3", "host": "h"}))
    assert (c.key, c.name) == ("pid:h:77", "nova-conductor")
    # a connection /proc missed joins the process it names by pid, among several of that name
    ids.client(oslo("y", pid=78, proc={"pid": "78", "name": "python3", "host": "h"}))
    d = ids.client(oslo("z", pid=77, proc={}))
    assert d.key == "pid:h:77"
    # names without that shape are kept whole
    plain = ids.client(_info(**{"amqp.client_properties": {"connection_name": "billing:v2"}}))
    assert (plain.key, plain.name) == ("self:billing:v2", "billing:v2")


def test_a_client_library_name_comes_after_the_process_and_reverse_dns() -> None:
    """ "pymysql" or "Pika Python Client Library" names a library every component
    uses: the process or the peer's DNS name says more."""
    ids = Identities()
    pymysql = {"_client_name": "pymysql", "_client_version": "1.1.1", "_pid": "3131"}
    local = ids.client(
        _info(
            proc={"pid": "9", "name": "nova-api", "host": "h"}, **{"mysql.connect_attrs": pymysql}
        )
    )
    assert (local.key, local.name) == ("pid:h:9", "nova-api")
    # a sidecar: no process, but the DNS name, and the pid the client gave, per process
    side = ids.client(_info(rdns={"name": "nova-api"}, **{"mysql.connect_attrs": pymysql}))
    assert (side.key, side.name) == ("self:10.0.0.5:nova-api:3131", "nova-api")
    assert side.resource["process.pid"] == 3131
    # nothing but the library: it names the component
    amqp = ids.client(_info(**{"amqp.client_properties": {"product": "py-amqp"}}))
    assert (amqp.key, amqp.name) == ("self:py-amqp", "py-amqp")
    # the application's own name still comes before the process's
    own = ids.client(
        _info(
            proc={"pid": "9", "name": "python3", "host": "h"},
            **{"mysql.connect_attrs": dict(pymysql, program_name="nova-scheduler")},
        )
    )
    assert own.name == "nova-scheduler"
