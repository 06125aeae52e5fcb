"""Which local process owns the other end of a TCP connection (like ``ss -p``).

For a loopback peer, the socket's owner is found the way ``ss -p`` does it: the
connection's inode from ``/proc/net/tcp`` (or ``tcp6``), then the process whose
``/proc/<pid>/fd`` links to ``socket:[inode]``. Scanning every process's file
descriptors costs milliseconds, so it never runs on the event loop: a
:class:`ProcResolver` thread takes requests, batches them (one scan serves
every connection accepted meanwhile), caches the inode map briefly, and reports
results through a callback. Reverse DNS for non-local peers is resolved in the
same thread, cached per address.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sniff.procinfo")

_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
# when a connection's socket is not owned by any process yet (still in a server's
# accept queue), look again after these delays (seconds): within the correlator's lag
RETRY_DELAYS = (0.05, 0.15, 0.4, 0.8)
_INTERPRETERS = ("python", "python3", "ruby", "node", "java", "perl", "php", "bash", "sh")


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    name: str
    exe: str
    cmdline: str


def _hex_addr(ip: str, port: int) -> tuple[str, str]:
    """The two spellings of ``ip:port`` in /proc/net/tcp (v4) and tcp6 (v4-mapped too)."""
    addr = ipaddress.ip_address(ip)
    p = f"{port:04X}"
    if addr.version == 4:
        v4 = f"{struct.unpack('<I', addr.packed)[0]:08X}:{p}"
        mapped = ipaddress.IPv6Address(f"::ffff:{ip}").packed
    else:
        v4 = ""
        mapped = addr.packed
    words = struct.unpack("<IIII", mapped)
    v6 = "".join(f"{w:08X}" for w in words) + f":{p}"
    return v4, v6


def socket_inodes(pairs: list[tuple[tuple[str, int], tuple[str, int]]]) -> dict[int, int]:
    """For each (local, remote) address pair (index -> inode) found in /proc/net/tcp*."""
    wanted: dict[tuple[str, str], int] = {}
    for i, (local, remote) in enumerate(pairs):
        l4, l6 = _hex_addr(*local)
        r4, r6 = _hex_addr(*remote)
        if l4:
            wanted[(l4, r4)] = i
        wanted[(l6, r6)] = i
    found: dict[int, int] = {}
    for table in _TCP_TABLES:
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10:
                        continue
                    idx = wanted.get((parts[1], parts[2]))
                    if idx is not None and parts[9] != "0":
                        found[idx] = int(parts[9])
        except OSError:
            continue
    return found


def inode_owners(inodes: set[int]) -> dict[int, int]:
    """inode -> pid for the given socket inodes, by scanning /proc/*/fd."""
    targets = {f"socket:[{i}]": i for i in inodes}
    owners: dict[int, int] = {}
    if not targets:
        return owners
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            inode = targets.get(link)
            if inode is not None and inode not in owners:
                owners[inode] = pid
                if len(owners) == len(targets):
                    return owners
    return owners


def listen_inodes(host: str, port: int) -> set[int]:
    """Inodes of LISTEN sockets that accept connections for ``host:port``
    (bound to that address or to the wildcard address)."""
    out: set[int] = set()
    p = f"{port:04X}"
    candidates = {
        f"{a}:{p}"
        for a in (
            _hex_addr(host, port)[0].split(":")[0],
            "00000000",
            "0" * 32,
            _hex_addr(host, port)[1].split(":")[0],
        )
        if a
    }
    for table in _TCP_TABLES:
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) >= 10 and parts[3] == "0A" and parts[1] in candidates:
                        out.add(int(parts[9]))
        except OSError:
            continue
    return out


def inode_all_owners(inodes: set[int]) -> set[int]:
    """Every pid holding one of ``inodes`` (a pre-forked server shares its listen socket)."""
    targets = {f"socket:[{i}]" for i in inodes}
    pids: set[int] = set()
    if not targets:
        return pids
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fd_dir = f"/proc/{entry.name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in targets:
                    pids.add(int(entry.name))
                    break
            except OSError:
                continue
    return pids


def process_info(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = argv[0] if argv else ""
    return ProcInfo(pid, process_name(exe, argv), exe, " ".join(argv)[:1000])


def process_name(exe: str, argv: list[str]) -> str:
    """A short component name: the program, or for an interpreter the script or
    module it runs (``python -m nova.api`` -> ``nova.api``)."""
    base = os.path.basename(exe or (argv[0] if argv else "?"))
    if not any(base.startswith(i) for i in _INTERPRETERS) or len(argv) < 2:
        return base
    args = argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-m" and i + 1 < len(args):
            return args[i + 1]
        if a == "-c":
            return f"{base} -c"
        if a.startswith("-"):
            i += 1
            continue
        name = os.path.basename(a)
        return name[:-3] if name.endswith(".py") else name
    return base


def is_local(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return False


@dataclass(slots=True)
class _Request:
    key: int  # the connection id (0 for a listener request)
    role: str  # "client", "server" or "listen"
    local: tuple[str, int]  # the peer socket's own address (listen: the upstream address)
    remote: tuple[str, int]  # the address it is connected to (ours); unused for "listen"
    proxy: str = ""
    attempt: int = 0


class ProcResolver:
    """Resolves peer processes (loopback) and reverse DNS (others) off the event
    loop and reports them as events through ``emit`` (called from its thread):

    - ``ConnIdentity(source="proc" | "proc.server", attrs={pid, name, exe, cmdline, host})``
      for the client / server end of a connection, with empty attrs when no local
      process owns it (so the correlator knows the lookup is over);
    - ``ConnIdentity(source="rdns" | "rdns.server", attrs={name})`` for non-local peers;
    - ``ProxyUpstream`` with the pids listening behind a proxy's upstream address.
    """

    def __init__(
        self, emit: Callable[[Any], None], min_interval: float = 0.02, rdns: bool = True
    ) -> None:
        self._emit = emit
        self._q: queue.Queue[_Request | None] = queue.Queue()
        self._min_interval = min_interval
        self._rdns = rdns
        self._host = socket.gethostname()
        self._dns_cache: dict[str, str | None] = {}
        self._proc_cache: dict[int, tuple[float, ProcInfo | None]] = {}
        self._listen_seen: dict[str, frozenset[int]] = {}
        self._thread = threading.Thread(target=self._run, name="sniff-procinfo", daemon=True)
        self._thread.start()
        self.resolved = 0

    def request(self, key: int, role: str, local: tuple[str, int], remote: tuple[str, int]) -> None:
        self._q.put(_Request(key, role, local, remote))

    def request_listen(self, proxy: str, host: str, port: int) -> None:
        self._q.put(_Request(0, "listen", (host, port), ("", 0), proxy))

    def _retry(self, r: _Request, delay: float) -> None:
        r.attempt += 1
        timer = threading.Timer(delay, self._q.put, args=(r,))
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last = 0.0
        while True:
            first = self._q.get()
            if first is None:
                return
            wait = self._min_interval - (time.monotonic() - last)
            if wait > 0:
                time.sleep(wait)  # let a burst of connections share one scan
            batch = [first]
            stop = False
            while True:
                try:
                    more = self._q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            last = time.monotonic()
            try:
                self._resolve(batch)
            except Exception:
                log.exception("resolving peer processes failed")
            if stop:
                return

    def _info(self, pid: int, now: float) -> ProcInfo | None:
        cached = self._proc_cache.get(pid)
        if cached is None or now - cached[0] > 5.0:
            cached = (now, process_info(pid))
            self._proc_cache[pid] = cached
        return cached[1]

    def _attrs(self, info: ProcInfo | None) -> dict[str, str]:
        if info is None:
            return {}
        return {
            "pid": str(info.pid),
            "name": info.name,
            "exe": info.exe,
            "cmdline": info.cmdline,
            "host": self._host,
        }

    def _resolve(self, batch: list[_Request]) -> None:
        from sniff.events import ConnIdentity, ProxyUpstream

        now = time.monotonic()
        listen = [r for r in batch if r.role == "listen"]
        conns = [r for r in batch if r.role != "listen"]
        local = [r for r in conns if is_local(r.local[0])]
        if local:
            inodes = socket_inodes([(r.local, r.remote) for r in local])
            owners = inode_owners(set(inodes.values()))
            for i, r in enumerate(local):
                inode = inodes.get(i)
                pid = owners.get(inode, None) if inode is not None else None
                if pid is None and r.attempt < len(RETRY_DELAYS):
                    # Not found yet: either no process holds the socket (a server that has
                    # not accept()ed it: a busy accept queue), or /proc/net/tcp skipped it
                    # (it is read page by page and entries are missed while connections
                    # churn; `ss` uses netlink for that reason). Ask again a little later.
                    self._retry(r, RETRY_DELAYS[r.attempt])
                    continue
                info = self._info(pid, now) if pid is not None else None
                self.resolved += 1
                source = "proc" if r.role == "client" else "proc.server"
                self._emit(ConnIdentity(time.time_ns(), r.key, source, self._attrs(info)))
        for r in conns:
            if is_local(r.local[0]):
                continue
            name = self._reverse_dns(r.local[0]) if self._rdns else None
            source = "rdns" if r.role == "client" else "rdns.server"
            self._emit(ConnIdentity(time.time_ns(), r.key, source, {"name": name} if name else {}))
        for r in listen:
            if not is_local(r.local[0]) and r.local[0] not in ("0.0.0.0", "::"):
                continue
            pids = inode_all_owners(listen_inodes(*r.local))
            key = f"{r.proxy}@{r.local}"
            if frozenset(pids) == self._listen_seen.get(key):
                continue
            self._listen_seen[key] = frozenset(pids)
            procs = [self._attrs(self._info(pid, now)) for pid in sorted(pids)]
            self._emit(
                ProxyUpstream(
                    time.time_ns(),
                    0,
                    r.proxy,
                    f"{r.local[0]}:{r.local[1]}",
                    [p for p in procs if p],
                )
            )
        if len(self._proc_cache) > 10_000:
            self._proc_cache.clear()

    def _reverse_dns(self, ip: str) -> str | None:
        if ip in self._dns_cache:
            return self._dns_cache[ip]
        name: str | None
        try:
            host = socket.gethostbyaddr(ip)[0]
            # compose: "project-nova-api-1.project_default" -> keep the first label
            name = host.split(".")[0] or None
        except (OSError, UnicodeError):
            name = None
        if len(self._dns_cache) > 10_000:
            self._dns_cache.clear()
        self._dns_cache[ip] = name
        return name
