"""The SQL picopool sends on its own behalf: probes, lag and session cleanup."""

# Seconds behind: zero when everything received is replayed (an idle primary is
# not lag), else the age of the last replayed transaction.
REPLICA_LAG_QUERY = """SELECT pg_last_wal_replay_lsn()::text,
    CASE WHEN pg_last_wal_receive_lsn() IS NULL
              OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
         ELSE extract(epoch FROM now() - coalesce(pg_last_xact_replay_timestamp(),
                                                 pg_postmaster_start_time())) END"""

# asyncpg's reset keeps SQL-level PREPAREd statements; this drops them (its own
# protocol-level statements have from_sql = false).
DEALLOCATE_SQL_PREPARED = """DO $picopool$ DECLARE name text; BEGIN
FOR name IN SELECT p.name FROM pg_prepared_statements p WHERE p.from_sql LOOP
EXECUTE format('DEALLOCATE %I', name); END LOOP; END $picopool$"""

# True when nothing in the database can change session state behind a statement:
# no user function that is not SQL/PL/pgSQL or whose body mentions anything
# session-changing (deliberately broad: "when in doubt, reset"), no view, rule,
# default, policy or trigger depending on set_config or an advisory lock
# function, and no event trigger.
ELISION_SAFE_QUERY = r"""SELECT NOT EXISTS (
    SELECT 1 FROM pg_proc p
    JOIN pg_namespace n ON n.oid = p.pronamespace
    JOIN pg_language l ON l.oid = p.prolang
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND (l.lanname NOT IN ('sql', 'plpgsql')
           OR p.prosrc ~* ('(set_config|advisory|listen|prepare|declare|execute|dblink'
                           '|\mset\M|\mreset\M)'))
) AND NOT EXISTS (
    SELECT 1 FROM pg_depend d
    JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND d.refobjid = p.oid
    WHERE d.classid IN ('pg_rewrite'::regclass, 'pg_attrdef'::regclass,
                        'pg_policy'::regclass, 'pg_trigger'::regclass)
      AND p.pronamespace = 'pg_catalog'::regnamespace
      AND (p.proname = 'set_config' OR p.proname LIKE 'pg%advisory%')
) AND NOT EXISTS (SELECT 1 FROM pg_event_trigger)"""
