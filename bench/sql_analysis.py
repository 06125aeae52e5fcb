"""Statement classification throughput on one core: what ``SqlStatement.prepare`` costs.

    .venv/bin/python bench/sql_analysis.py [--statements 200000] [--dialect mysql]

Generates an OpenStack-like workload: the statement shapes nova, neutron, keystone,
cinder and glance send through SQLAlchemy + PyMySQL (wide SELECTs with aliased
columns and LEFT OUTER JOINs, IN lists of varying length, correlated subqueries,
multi-row INSERTs, UPDATE ... WHERE, soft deletes, SAVEPOINT/ROLLBACK TO/RELEASE,
SELECT 1 pings), with fresh literals (UUIDs, ids, timestamps) in every statement,
so exact-text repetition is rare and the shape cache does the work.

It measures, in one process pinned to the current core:

- warm throughput of ``analyze_normalize`` (operation, tables, summary and the
  literal-free text, i.e. everything prepare() computes), statements per second;
- the cold cost of a cache miss (sqlglot parse) per shape;
- the cache hit ratio over the run.

Target (issue 3): at least 50,000 statements per second on one core.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxies.sql import analysis

R = random.Random(42)


def _u() -> str:
    return str(uuid.UUID(int=R.getrandbits(128)))


def _ts() -> str:
    return f"2026-{R.randint(1, 12):02d}-{R.randint(1, 28):02d} {R.randint(0, 23):02d}:{R.randint(0, 59):02d}:{R.randint(0, 59):02d}.{R.randint(0, 999999):06d}"


def _cols(table: str, names: list[str]) -> str:
    return ", ".join(f"{table}.{n} AS {table}_{n}" for n in names)


_INSTANCE_COLS = [
    "created_at",
    "updated_at",
    "deleted_at",
    "deleted",
    "id",
    "user_id",
    "project_id",
    "image_ref",
    "kernel_id",
    "ramdisk_id",
    "hostname",
    "launch_index",
    "key_name",
    "key_data",
    "power_state",
    "vm_state",
    "task_state",
    "memory_mb",
    "vcpus",
    "root_gb",
    "ephemeral_gb",
    "ephemeral_key_uuid",
    "host",
    "node",
    "instance_type_id",
    "user_data",
    "reservation_id",
    "launched_at",
    "terminated_at",
    "availability_zone",
    "display_name",
    "display_description",
    "launched_on",
    "locked",
    "locked_by",
    "os_type",
    "architecture",
    "vm_mode",
    "uuid",
    "root_device_name",
    "default_ephemeral_device",
    "default_swap_device",
    "config_drive",
    "access_ip_v4",
    "access_ip_v6",
    "auto_disk_config",
    "progress",
    "shutdown_terminate",
    "disable_terminate",
    "cell_name",
    "internal_id",
    "cleaned",
]
_PORT_COLS = [
    "project_id",
    "id",
    "name",
    "network_id",
    "mac_address",
    "admin_state_up",
    "status",
    "device_id",
    "device_owner",
    "ip_allocation",
    "standard_attr_id",
]


def _in_list(n: int, f: Callable[[], str]) -> str:
    return ", ".join(f"'{f()}'" for _ in range(n))


TEMPLATES: list[Callable[[], str]] = [
    # nova: instance_get_by_uuid with info cache join
    lambda: (
        f"SELECT {_cols('instances', _INSTANCE_COLS)}, instance_info_caches_1.created_at AS "
        "instance_info_caches_1_created_at, instance_info_caches_1.network_info AS "
        "instance_info_caches_1_network_info FROM instances LEFT OUTER JOIN instance_info_caches AS "
        "instance_info_caches_1 ON instance_info_caches_1.instance_uuid = instances.uuid WHERE "
        f"instances.deleted = 0 AND instances.uuid = '{_u()}' LIMIT 1"
    ),
    # nova: instances on a host (periodic task), IN list of states
    lambda: (
        f"SELECT {_cols('instances', _INSTANCE_COLS[:20])} FROM instances WHERE "
        f"instances.deleted = 0 AND instances.host = 'compute-{R.randint(1, 40)}' AND "
        f"instances.vm_state IN ({_in_list(R.randint(1, 4), lambda: R.choice(['active', 'building', 'stopped', 'paused']))})"
    ),
    # nova: instance actions insert
    lambda: (
        "INSERT INTO instance_actions (created_at, updated_at, deleted_at, deleted, action, "
        "instance_uuid, request_id, user_id, project_id, start_time, finish_time, message) VALUES "
        f"('{_ts()}', NULL, NULL, 0, 'create', '{_u()}', 'req-{_u()}', '{_u().replace('-', '')}', "
        f"'{_u().replace('-', '')}', '{_ts()}', NULL, NULL)"
    ),
    # nova: update instance state
    lambda: (
        f"UPDATE instances SET updated_at='{_ts()}', vm_state='active', task_state=NULL, "
        f"power_state={R.randint(0, 4)}, launched_at='{_ts()}' WHERE instances.uuid = '{_u()}' AND "
        "instances.deleted = 0"
    ),
    # nova: quota usage with subquery
    lambda: (
        "SELECT count(instances.id) AS count_1, coalesce(sum(instances.vcpus), 0) AS sum_1, "
        "coalesce(sum(instances.memory_mb), 0) AS sum_2 FROM instances WHERE instances.deleted = 0 "
        f"AND instances.project_id = '{_u().replace('-', '')}' AND instances.uuid NOT IN (SELECT "
        "migrations.instance_uuid FROM migrations WHERE migrations.deleted = 0 AND "
        f"migrations.status IN ('migrating', 'post-migrating'))"
    ),
    # neutron: ports by device ids (IN list of varying length)
    lambda: (
        f"SELECT {_cols('ports', _PORT_COLS)}, standardattributes_1.id AS "
        "standardattributes_1_id, standardattributes_1.revision_number AS "
        "standardattributes_1_revision_number FROM ports JOIN standardattributes AS "
        "standardattributes_1 ON standardattributes_1.id = ports.standard_attr_id WHERE "
        f"ports.device_id IN ({_in_list(R.randint(1, 50), _u)})"
    ),
    # neutron: ip allocations join subnets
    lambda: (
        "SELECT ipallocations.port_id AS ipallocations_port_id, ipallocations.ip_address AS "
        "ipallocations_ip_address, ipallocations.subnet_id AS ipallocations_subnet_id, "
        "subnets.cidr AS subnets_cidr FROM ipallocations INNER JOIN subnets ON subnets.id = "
        f"ipallocations.subnet_id WHERE ipallocations.network_id = '{_u()}' ORDER BY "
        "ipallocations.ip_address"
    ),
    # neutron: multi-row insert of standard attributes
    lambda: (
        "INSERT INTO standardattributes (resource_type, description, revision_number, "
        "created_at, updated_at) VALUES "
        + ", ".join(f"('ports', '', 0, '{_ts()}', '{_ts()}')" for _ in range(R.randint(1, 8)))
    ),
    # neutron: delete by id
    lambda: f"DELETE FROM portbindingports WHERE portbindingports.port_id = '{_u()}'",
    # keystone: token validation chain
    lambda: (
        "SELECT user.id AS user_id, user.extra AS user_extra, user.enabled AS user_enabled, "
        "user.default_project_id AS user_default_project_id, user.created_at AS user_created_at, "
        "user.last_active_at AS user_last_active_at, user.domain_id AS user_domain_id FROM user "
        f"WHERE user.id = '{_u().replace('-', '')}'"
    ),
    lambda: (
        "SELECT assignment.type AS assignment_type, assignment.actor_id AS "
        "assignment_actor_id, assignment.target_id AS assignment_target_id, assignment.role_id AS "
        "assignment_role_id, assignment.inherited AS assignment_inherited FROM assignment WHERE "
        f"assignment.actor_id IN ({_in_list(R.randint(1, 6), lambda: _u().replace('-', ''))}) AND "
        f"assignment.target_id = '{_u().replace('-', '')}' AND assignment.inherited = false"
    ),
    # keystone: revocation events since
    lambda: (
        "SELECT revocation_event.id AS revocation_event_id, revocation_event.domain_id AS "
        "revocation_event_domain_id FROM revocation_event WHERE revocation_event.revoked_at > "
        f"'{_ts()}' ORDER BY revocation_event.revoked_at"
    ),
    # cinder: volume with attachments and metadata
    lambda: (
        "SELECT volumes.id AS volumes_id, volumes.size AS volumes_size, volumes.status AS "
        "volumes_status, volume_attachment_1.id AS volume_attachment_1_id, "
        "volume_metadata_1.key AS volume_metadata_1_key FROM volumes LEFT OUTER JOIN "
        "volume_attachment AS volume_attachment_1 ON volumes.id = volume_attachment_1.volume_id AND "
        "volume_attachment_1.deleted = false LEFT OUTER JOIN volume_metadata AS volume_metadata_1 "
        "ON volume_metadata_1.volume_id = volumes.id AND volume_metadata_1.deleted = false WHERE "
        f"volumes.deleted = false AND volumes.id = '{_u()}'"
    ),
    # glance: image by id with properties
    lambda: (
        "SELECT images.id, images.name, images.size, images.status, image_properties.name "
        "AS prop_name, image_properties.value FROM images LEFT OUTER JOIN image_properties ON "
        f"images.id = image_properties.image_id WHERE images.id = '{_u()}' AND images.deleted = 0"
    ),
    # placement-ish: allocation candidates with EXISTS subquery
    lambda: (
        "SELECT rp.id, rp.uuid FROM resource_providers AS rp WHERE EXISTS (SELECT 1 FROM "
        "inventories AS inv WHERE inv.resource_provider_id = rp.id AND inv.resource_class_id = "
        f"{R.randint(0, 3)} AND inv.total - inv.reserved >= {R.randint(1, 64)}) LIMIT {R.randint(10, 1000)}"
    ),
    # oslo.db / SQLAlchemy plumbing
    lambda: "SELECT 1",
    lambda: "COMMIT",
    lambda: "ROLLBACK",
    lambda: f"SAVEPOINT sa_savepoint_{R.randint(1, 9)}",
    lambda: f"RELEASE SAVEPOINT sa_savepoint_{R.randint(1, 9)}",
    lambda: "SET autocommit=0",
    lambda: "SHOW VARIABLES LIKE 'sql_mode'",
    # reservation update with arithmetic
    lambda: (
        f"UPDATE quota_usages SET updated_at='{_ts()}', in_use=(quota_usages.in_use + "
        f"{R.randint(1, 8)}) WHERE quota_usages.id = {R.randint(1, 100000)}"
    ),
    # soft delete
    lambda: (
        f"UPDATE instance_system_metadata SET deleted_at='{_ts()}', deleted=id, "
        f"updated_at=updated_at WHERE instance_system_metadata.instance_uuid = '{_u()}' AND "
        "instance_system_metadata.deleted = 0"
    ),
]
# weights: reads dominate, as in a real control plane
WEIGHTS = [6, 4, 2, 3, 1, 3, 2, 1, 1, 6, 5, 1, 2, 2, 1, 8, 6, 2, 2, 2, 2, 1, 1, 1]


def workload(n: int) -> list[str]:
    picks = R.choices(range(len(TEMPLATES)), weights=WEIGHTS, k=n)
    return [TEMPLATES[i]() for i in picks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--statements", type=int, default=200_000)
    ap.add_argument("--dialect", default="mysql")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    print(f"generating {args.statements:,} statements from {len(TEMPLATES)} templates...")
    stmts = workload(args.statements)
    avg_len = statistics.mean(len(s) for s in stmts)
    print(f"  average length {avg_len:,.0f} chars, longest {max(len(s) for s in stmts):,}")

    analysis.clear_cache()
    # cold: the first statement of each template (sqlglot parse on a miss)
    cold = []
    for t in TEMPLATES:
        s = t()
        t0 = time.perf_counter()
        analysis.analyze_normalize(s, args.dialect)
        cold.append(time.perf_counter() - t0)
    analysis.clear_cache()

    fn = analysis.analyze_normalize
    d = args.dialect
    t0 = time.perf_counter()
    for s in stmts:
        fn(s, d)
    total = time.perf_counter() - t0
    st = dict(analysis.stats)
    rate = len(stmts) / total
    print(
        f"cold (cache miss, sqlglot): median {statistics.median(cold) * 1e3:.2f} ms, "
        f"max {max(cold) * 1e3:.2f} ms per shape"
    )
    print(
        f"run: {len(stmts):,} statements in {total:.2f} s on one core -> "
        f"{rate:,.0f} statements/s ({total / len(stmts) * 1e6:.1f} us each)"
    )
    print(
        f"  exact-text hits {st['exact_hits']:,}, shape hits {st['shape_hits']:,}, "
        f"keyword-only {st['keyword_only']:,}, sqlglot parses {st['parses']:,}"
    )
    target = 50_000
    print(
        f"target >= {target:,}/s: {'MET' if rate >= target else 'NOT MET'} ({rate / target:.2f}x)"
    )

    # the whole of SqlStatement.prepare(): analysis, literal-free text, shared ids (UUIDs),
    # sqlcommenter traceparent lookup, on fresh events as the capture writer sees them
    from proxies.sql.events import MysqlQuery

    analysis.clear_cache()
    events = [
        MysqlQuery(
            0,
            1,
            "mariadb",
            "nova",
            "COM_QUERY",
            s,
            False,
            1,
            "ok",
            None,
            None,
            None,
            None,
            "0000000000000001",
        )
        for s in stmts
    ]
    t0 = time.perf_counter()
    for e in events:
        e.prepare()
    total = time.perf_counter() - t0
    print(
        f"full prepare() per event: {len(events) / total:,.0f} events/s "
        f"({total / len(events) * 1e6:.1f} us each)"
    )


if __name__ == "__main__":
    main()
