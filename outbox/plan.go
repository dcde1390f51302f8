package outbox

import (
	"database/sql"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

// freshPlan returns args for a statement that must be planned from the
// table's current size each time it runs: on a pool of pgx's database/sql
// driver it puts pgx.QueryExecModeExec in front of them.
//
// pgx prepares each statement once per connection and keeps it; after five
// executions PostgreSQL may keep a generic plan of it, built from the
// table's statistics at that moment. An outbox is often empty — and after
// autovacuum truncates it, PostgreSQL believes it empty — so a relay that
// idled keeps plans of an empty table: sequential scans, sorts and nested
// loops that re-run subqueries, each fine on no rows and quadratic on a
// burst of 20,000 (issue 18: one claim of 256 took 1–12 s). No way of
// writing the claim has a good plan for every size when the planner
// believes the table empty, so the statements whose cost follows the
// table's size run as pgx's unnamed statement instead, parsed and planned
// at each execution (still one round trip; planning costs a fraction of a
// millisecond against a claim of up to BatchSize rows).
//
// Other drivers are left alone: lib/pq, for one, already runs every
// statement with arguments as an unnamed statement.
func freshPlan(db *sql.DB, args ...any) []any {
	if _, ok := db.Driver().(*stdlib.Driver); ok {
		return append([]any{pgx.QueryExecModeExec}, args...)
	}
	return args
}
