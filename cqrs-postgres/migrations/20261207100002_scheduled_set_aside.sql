-- A scheduled command that cannot fire is set aside instead of being looked at again and again:
-- unreadable at once, failing after a few attempts (each failure counts in `attempts` and moves
-- `due` to the next try). Set-aside rows are not due; an operator retries (set_aside = false) or
-- discards (deletes) them. Scheduling the same name anew clears all three columns.
ALTER TABLE cqrs_scheduled ADD COLUMN attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0);
ALTER TABLE cqrs_scheduled ADD COLUMN error text;
ALTER TABLE cqrs_scheduled ADD COLUMN set_aside boolean NOT NULL DEFAULT false;
DROP INDEX cqrs_scheduled_due;
CREATE INDEX cqrs_scheduled_due ON cqrs_scheduled (owner, due) WHERE NOT set_aside;
