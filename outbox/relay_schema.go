package outbox

// relayDDL returns the statements that create the tables relays coordinate
// through: one lease row per partition and one row per live relay.
//
// Owned by the relay; see lease.go for how leases are taken, renewed and
// handed over. Times are database times (expires_at > now() is live).
func relayDDL(d Dialect, table string) []string {
	leases, relays := d.quote(table+suffixLeases), d.quote(table+suffixRelays)
	switch d.Name() {
	case "postgres":
		return []string{
			`CREATE TABLE IF NOT EXISTS ` + leases + ` (
	partition_no INTEGER     PRIMARY KEY,
	owner        TEXT        NOT NULL,
	token        BIGINT      NOT NULL,
	expires_at   TIMESTAMPTZ NOT NULL
)`,
			`CREATE TABLE IF NOT EXISTS ` + relays + ` (
	owner        TEXT        PRIMARY KEY,
	partitions   INTEGER     NOT NULL,
	started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
	expires_at   TIMESTAMPTZ NOT NULL
)`,
		}
	case "mysql":
		return []string{
			`CREATE TABLE IF NOT EXISTS ` + leases + ` (
	partition_no INT          NOT NULL PRIMARY KEY,
	owner        VARCHAR(255) NOT NULL,
	token        BIGINT       NOT NULL,
	expires_at   DATETIME(6)  NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
			`CREATE TABLE IF NOT EXISTS ` + relays + ` (
	owner        VARCHAR(255) NOT NULL PRIMARY KEY,
	partitions   INT          NOT NULL,
	started_at   DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
	expires_at   DATETIME(6)  NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin`,
		}
	default: // sqlite
		return []string{
			`CREATE TABLE IF NOT EXISTS ` + leases + ` (
	partition_no INTEGER PRIMARY KEY,
	owner        TEXT    NOT NULL,
	token        INTEGER NOT NULL,
	expires_at   TEXT    NOT NULL
)`,
			`CREATE TABLE IF NOT EXISTS ` + relays + ` (
	owner        TEXT    PRIMARY KEY,
	partitions   INTEGER NOT NULL,
	started_at   TEXT    NOT NULL DEFAULT ` + sqliteNow + `,
	expires_at   TEXT    NOT NULL
)`,
		}
	}
}
