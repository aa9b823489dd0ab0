-- scripts/compose-check: a read-only role for the dashboard (SELECT only, never writes).
-- Tables are created later by the runner (as "harness"); default privileges cover them.
CREATE ROLE harness_ro LOGIN PASSWORD 'harness_ro';
ALTER ROLE harness_ro SET default_transaction_read_only = on;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CONNECT ON DATABASE harness TO harness_ro;
GRANT USAGE ON SCHEMA public TO harness_ro;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO harness_ro;
ALTER DEFAULT PRIVILEGES FOR ROLE harness IN SCHEMA public GRANT SELECT ON TABLES TO harness_ro;
ALTER DEFAULT PRIVILEGES FOR ROLE harness IN SCHEMA public GRANT SELECT ON SEQUENCES TO harness_ro;
